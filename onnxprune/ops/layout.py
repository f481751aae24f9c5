"""Ops that move channels around without mixing them: Concat, Flatten, Reshape,
Squeeze and Unsqueeze. (Channel shuffles: shuffle.py; Split and Slice: slicing.py.)"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InternalError
from .base import ChannelState, RewriteContext, Rule, attr, axes_of, const, normalise_axes, opt_input, prod
from .shuffle import find_shuffle, follow_shuffle


class ConcatRule(Rule):
    """Concat on axis 1 places each input's channels at an offset of the output;
    on any other axis it ties the inputs' channels together like an Add."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        y_shape = st.shape(node.outputs[0])
        maps = [st.channels(t) for t in node.inputs]
        if y_shape is None or any(m is None for m in maps):
            st.refuse(node, "Concat with unknown shapes")
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
    """Follows three reshapes exactly: flattening (N, C, ...) to (N, C*...), reshapes
    that keep N and C and only regroup the trailing axes, and the two of a channel
    shuffle (shuffle.py). The constant target shape is updated where it spells out
    the channel count (the count per part, in a shuffle's first Reshape)."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        if follow_shuffle(node, st):
            return
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
            if target is None:
                why = "Reshape whose target shape is computed at run time"
            elif known:
                why = f"Reshape of {tuple(x_shape[1:])} to {tuple(y_shape[1:])} moves the channels"
            else:
                why = "Reshape with unknown shapes or allowzero"
            st.refuse(node, why, "channels made by Reshape, which the analysis does not follow")

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        sh, _ = find_shuffle(node, ctx.shape)
        if sh is not None and node is sh.first:
            self._rewrite_split(node, sh.groups, sh.per_group, ctx)
            return
        keep = ctx.keep(node.outputs[0])
        target = const(opt_input(node, 1))
        if keep is None or target is None or target.size < 2 or int(target[1]) <= 0:
            return
        new = target.copy()
        new[1] = int(keep.sum())
        ctx.set_constant(node, 1, new)

    @staticmethod
    def _rewrite_split(node: gs.Node, groups: int, per_group: int, ctx: RewriteContext) -> None:
        """(N, g, C/g, ...): C/g becomes the count every part keeps."""
        keep = ctx.keep(node.inputs[0])
        if keep is None:
            return
        parts = keep.reshape(groups, per_group)
        if not (parts == parts[0]).all():
            raise InternalError(f"the parts of channel shuffle {node.name} lost different channels")
        target = const(opt_input(node, 1))
        if int(target[2]) > 0:
            new = target.copy()
            new[2] = int(parts[0].sum())
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
