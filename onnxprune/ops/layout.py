"""Ops that move channels around without mixing them: Concat, Flatten, Reshape,
Squeeze and Unsqueeze."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import ChannelState, RewriteContext, Rule, attr, axes_of, const, normalise_axes, opt_input, prod


class ConcatRule(Rule):
    """Concat on axis 1 places each input's channels at an offset of the output;
    on any other axis it ties the inputs' channels together like an Add."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        y_shape = st.shape(node.outputs[0])
        maps = [st.channels(t) for t in node.inputs]
        if y_shape is None or any(m is None for m in maps):
            st.block_inputs(node, "Concat with unknown shapes")
            st.opaque_outputs(node, "Concat with unknown shapes")
            return
        axis = int(attr(node, "axis")) % len(y_shape)
        if axis == 1:
            st.set_channels(node.outputs[0], np.concatenate(maps))
        else:
            for m in maps[1:]:
                st.union(maps[0], m)
            st.set_channels(node.outputs[0], maps[0])


def _flatten_map(st: ChannelState, x: gs.Tensor) -> np.ndarray | None:
    """Channel map of x flattened from axis 1: each channel repeated once per pixel."""
    shape = st.shape(x)
    atoms = st.channels(x)
    if shape is None or atoms is None or any(d is None for d in shape[2:]):
        return None
    return np.repeat(atoms, prod(shape[2:]))


class FlattenRule(Rule):
    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        shape = st.shape(node.inputs[0])
        flat = _flatten_map(st, node.inputs[0]) if shape is not None and len(shape) >= 2 else None
        if int(attr(node, "axis", 1)) % max(len(shape or (1,)), 1) != 1 or flat is None:
            super().propagate(node, st)
            return
        st.set_channels(node.outputs[0], flat)


class ReshapeRule(Rule):
    """Follows two reshapes exactly: flattening (N, C, ...) to (N, C*...), and
    reshapes that keep N and C and only regroup the trailing axes. The constant
    target shape is updated where it spells out the channel count."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        x_shape, y_shape = st.shape(node.inputs[0]), st.shape(node.outputs[0])
        target = const(opt_input(node, 1))
        known = (x_shape is not None and y_shape is not None and target is not None
                 and len(x_shape) >= 2 and len(y_shape) >= 2 and target.size == len(y_shape)
                 and None not in x_shape[1:] and None not in y_shape[1:]
                 and not attr(node, "allowzero", 0))
        if known and len(y_shape) == 2 and y_shape[1] == prod(x_shape[1:]):
            st.set_channels(node.outputs[0], _flatten_map(st, node.inputs[0]))
        elif known and y_shape[1] == x_shape[1] and prod(y_shape[2:]) == prod(x_shape[2:]):
            st.set_channels(node.outputs[0], st.channels(node.inputs[0]))
        else:
            super().propagate(node, st)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        keep = ctx.keep(node.outputs[0])
        target = const(opt_input(node, 1))
        if keep is None or target is None or target.size < 2 or int(target[1]) <= 0:
            return
        new = target.copy()
        new[1] = int(keep.sum())
        ctx.set_constant(node, 1, new)


class SqueezeRule(Rule):
    """(Un)squeezing axes after the channel axis keeps channels on axis 1."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        axes = axes_of(node, 1)
        x_shape, y_shape = st.shape(node.inputs[0]), st.shape(node.outputs[0])
        rank = len(y_shape if node.op == "Unsqueeze" else x_shape) if (x_shape and y_shape) else None
        if axes in (None, "missing") or rank is None or set(normalise_axes(axes, rank)) & {0, 1}:
            super().propagate(node, st)
            return
        st.set_channels(node.outputs[0], st.channels(node.inputs[0]))
