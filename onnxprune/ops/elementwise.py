"""Element-wise ops of several inputs (Add, Mul, Max, ...): they tie channels together."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import ChannelState, RewriteContext, Rule, channel_axis_of_param, const

ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where",
                   "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
                   "BitShift", "Mod")


class ElementwiseRule(Rule):
    """Inputs that span all channels are coupled position by position (a residual
    Add, a Squeeze-Excite gate's Mul); constant inputs with a channel axis are
    sliced with the output's channels; inputs broadcast over channels are left alone."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        y = node.outputs[0]
        y_shape = st.shape(y)
        if y_shape is None or len(y_shape) < 2 or y_shape[1] is None:
            st.block_inputs(node, f"{node.op} with unknown output shape")
            return
        rank, channels = len(y_shape), y_shape[1]
        full = []
        for t in node.inputs:
            shape = st.shape(t)
            if isinstance(t, gs.Constant) or shape is None:
                continue
            axis = channel_axis_of_param(shape, rank)
            if axis is None or shape[axis] == 1:
                continue  # broadcast over channels: nothing to couple
            if len(shape) == rank and shape[1] == channels:
                full.append(st.channels(t))
            else:
                st.refuse(node, f"{node.op} with a channel-wise input of another rank",
                          f"{node.op} broadcasting channels")
                return
        if not full or any(f is None for f in full):
            st.opaque_outputs(node, f"{node.op} of constants")
            return
        for other in full[1:]:
            st.union(full[0], other)
        st.set_channels(y, full[0])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        keep = ctx.keep(node.outputs[0])
        y_shape = ctx.shape(node.outputs[0])
        if keep is None or y_shape is None:
            return
        for index, t in enumerate(node.inputs):
            value = const(t)
            if value is None:
                continue
            axis = channel_axis_of_param(value.shape, len(y_shape))
            if axis is not None and value.shape[axis] == len(keep) and len(keep) > 1:
                ctx.set_constant(node, index, np.compress(keep, value, axis=axis))
