"""Ops that keep every channel apart: output channel i depends on input channel i only."""

from __future__ import annotations


import numpy as np
import onnx_graphsurgeon as gs

from .base import (ChannelState, RewriteContext, Rule, attr, axes_of, channel_axis_of_param, const, normalise_axes,
                   opt_input)

# Element-wise activations and math of one tensor (every activation of the ONNX
# operator set; the quantisation-free, float-valued ones).
UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "ThresholdedRelu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg",
    "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Clip",
    "Cast", "Identity", "Dropout", "Not", "IsNaN", "IsInf", "Shrink", "Relu6",
)
POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")


class PassThroughRule(Rule):
    """Output 0 carries input 0's channels unchanged; other inputs are scalars or shapes."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        st.set_channels(node.outputs[0], st.channels(node.inputs[0]))
        for extra in node.outputs[1:]:
            # e.g. MaxPool's Indices: flat indices encode channel positions
            if extra.name and extra.outputs:
                st.block(st.channels(node.inputs[0]), node, f"{node.op} output {extra.name!r} encodes channel positions")
                st.opaque_outputs(node, f"{node.op} secondary output")


class ChannelParamRule(PassThroughRule):
    """Pass-through ops with per-channel parameters in inputs 1.. (BatchNormalization,
    InstanceNormalization, PRelu): the parameters are sliced with the channels."""

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        keep = ctx.keep(node.inputs[0])
        if keep is None:
            return
        shape = ctx.shape(node.inputs[0])
        rank = len(shape) if shape is not None else None
        for index in range(1, len(node.inputs)):
            value = const(opt_input(node, index))
            if value is None:
                continue
            if node.op == "PRelu":
                axis = channel_axis_of_param(value.shape, rank) if rank else None
                if axis is None or value.shape[axis] == 1:
                    continue
                ctx.set_constant(node, index, np.compress(keep, value, axis=axis))
            elif value.ndim == 1 and value.shape[0] == len(keep):
                ctx.set_constant(node, index, value[keep])

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        for index in range(1, len(node.inputs)):
            t = opt_input(node, index)
            if t is not None and const(t) is None:
                st.refuse(node, f"{node.op} with non-constant parameters")
                return
        if node.op == "BatchNormalization" and len([o for o in node.outputs if o.name]) > 1:
            st.refuse(node, "BatchNormalization in training mode")
            return
        super().propagate(node, st)


class AxisRule(PassThroughRule):
    """Ops along one axis (Softmax, LogSoftmax, Hardmax, LRN): channel mixing blocks."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        shape = st.shape(node.inputs[0])
        rank = len(shape) if shape is not None else None
        if node.op == "LRN":
            mixes = True  # normalises each channel by its neighbours
        elif rank is None:
            mixes = True
        else:
            opset = st.opset
            axis = int(attr(node, "axis", -1 if opset >= 13 else 1)) % rank
            # before opset 13 these ops flatten axes [axis:] into one, mixing axis 1 when axis <= 1
            mixes = axis == 1 or (opset < 13 and axis <= 1)
        if mixes:
            st.refuse(node, f"{node.op} mixes channels", f"{node.op} over channels")
        else:
            super().propagate(node, st)


class ReduceRule(PassThroughRule):
    """Reductions over spatial axes keep channels apart; over axis 0 or 1 they block."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        shape = st.shape(node.inputs[0])
        axes = axes_of(node, 1)
        if shape is None or axes is None or axes == "missing" or len(axes) == 0 and not attr(node, "noop_with_empty_axes", 0):
            st.refuse(node, f"{node.op} over all or unknown axes")
            return
        if set(normalise_axes(axes, len(shape))) & {0, 1}:
            st.refuse(node, f"{node.op} over the batch or channel axis")
            return
        super().propagate(node, st)


class PadRule(PassThroughRule):
    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        pads = attr(node, "pads")
        if pads is None:
            pads = const(opt_input(node, 1))
        shape = st.shape(node.inputs[0])
        ok = pads is not None and shape is not None and opt_input(node, 3) is None
        if ok:
            pads = np.asarray(pads).reshape(-1)
            rank = len(shape)
            ok = len(pads) == 2 * rank and pads[1] == 0 and pads[1 + rank] == 0
        if not ok:
            st.refuse(node, "Pad on the channel axis or with dynamic pads", "Pad on the channel axis")
            return
        super().propagate(node, st)


class ResizeRule(PassThroughRule):
    """Resize / Upsample with scale 1 on the batch and channel axes."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        x_shape, y_shape = st.shape(node.inputs[0]), st.shape(node.outputs[0])
        same = (x_shape is not None and y_shape is not None and len(x_shape) == len(y_shape) >= 2
                and x_shape[1] is not None and x_shape[1] == y_shape[1])
        if not same:
            st.refuse(node, f"{node.op} that may change the channel axis", f"{node.op} on channels")
            return
        super().propagate(node, st)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        keep = ctx.keep(node.inputs[0])
        # an explicit 'sizes' input holds the channel count
        sizes_index = 3 if node.op == "Resize" else None
        sizes = const(opt_input(node, sizes_index)) if sizes_index is not None else None
        if keep is not None and sizes is not None and sizes.size > 1:
            new = sizes.copy()
            new[1] = int(keep.sum())
            ctx.set_constant(node, sizes_index, new)
