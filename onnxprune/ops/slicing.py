"""Split and Slice: along the channel axis each output carries a range of its input's
channels; along any other axis every output carries all of them."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InternalError
from .base import ChannelState, RewriteContext, Rule, attr, const, opt_input


def _axis(node: gs.Node, rank: int) -> int:
    return int(attr(node, "axis", 0)) % rank


def split_sizes(node: gs.Node, dim: int) -> Union[List[int], str]:
    """The sizes of a Split along an axis of ``dim`` positions, or why they are unknown."""
    n = len(node.outputs)
    if "split" in node.attrs:  # opset < 13
        sizes = [int(s) for s in node.attrs["split"]]
    elif opt_input(node, 1) is not None:  # opset >= 13
        value = const(opt_input(node, 1))
        if value is None:
            return "Split sizes computed at run time"
        sizes = [int(s) for s in value.reshape(-1)]
    elif "num_outputs" in node.attrs:  # opset >= 18: equal chunks, the last one smaller
        chunk = -(-dim // int(node.attrs["num_outputs"]))
        sizes = [min(chunk, max(dim - chunk * i, 0)) for i in range(n)]
    else:
        if dim % n:
            return f"Split of {dim} channels into {n} equal parts"
        sizes = [dim // n] * n
    if len(sizes) != n or sum(sizes) != dim or min(sizes) < 1:
        return f"Split sizes {sizes} do not cut {dim} channels into {n} non-empty parts"
    return sizes


class SplitRule(Rule):
    """Output k gets its slice of the input's channel map; the rewrite writes the kept counts
    as the split sizes (as an input from opset 13, replacing num_outputs at opset 18)."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        x = node.inputs[0]
        shape = st.shape(x)
        if shape is None:
            st.refuse(node, "Split of unknown rank")
            return
        atoms = st.channels(x)
        if _axis(node, len(shape)) != 1:
            for out in node.outputs:
                st.set_channels(out, atoms)
            return
        sizes = split_sizes(node, shape[1]) if shape[1] is not None else "Split of unknown channels"
        if isinstance(sizes, str) or atoms is None:
            st.refuse(node, sizes if isinstance(sizes, str) else "Split of unknown channels",
                      "channels of a Split the analysis does not follow")
            return
        start = 0
        for out, size in zip(node.outputs, sizes):
            part = atoms[start:start + size]
            st.set_channels(out, part)
            st.nonempty(part)
            start += size

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        shape = ctx.shape(node.inputs[0])
        if shape is None or _axis(node, len(shape)) != 1:
            return
        keeps = [ctx.keep(out) for out in node.outputs]
        if all(k is None for k in keeps):
            return
        sizes = split_sizes(node, int(shape[1]))
        if isinstance(sizes, str):
            raise InternalError(f"Split {node.name} lost channels but its sizes are unknown: {sizes}")
        sizes = [int(k.sum()) if k is not None else n for k, n in zip(keeps, sizes)]
        if min(sizes) < 1:
            raise InternalError(f"Split {node.name} would make an output of no channels")
        if "split" in node.attrs or ctx.opset < 13:
            ctx.set_attr(node, "split", sizes)
            return
        old = const(opt_input(node, 1))
        ctx.set_constant(node, 1, np.array(sizes, dtype=old.dtype if old is not None else np.int64))
        if "num_outputs" in node.attrs:
            ctx.set_attr(node, "num_outputs", None)  # the sizes are explicit now


def _slice_inputs(node: gs.Node, rank: int) -> Union[Tuple[Optional[int], dict], str]:
    """(index of the channel axis among the Slice's axes or None, the constants), or why not."""
    if "starts" in node.attrs:
        return "Slice of opset < 10"
    axes_t, steps_t = opt_input(node, 3), opt_input(node, 4)
    axes = const(axes_t) if axes_t is not None else None
    if axes_t is not None and axes is None:
        return "Slice with axes computed at run time"
    starts, ends = const(node.inputs[1]), const(opt_input(node, 2))
    count = len(axes.reshape(-1)) if axes is not None else (starts.size if starts is not None else None)
    if count is None:
        return "Slice with starts computed at run time and no axes"
    axes = [int(a) % rank for a in axes.reshape(-1)] if axes is not None else list(range(count))
    if 1 not in axes:
        return None, {}
    i = axes.index(1)
    steps = const(steps_t) if steps_t is not None else None
    if starts is None or ends is None or (steps_t is not None and steps is None):
        return "Slice along channels with bounds computed at run time"
    step = int(steps.reshape(-1)[i]) if steps is not None else 1
    if step != 1:
        return f"Slice along channels with step {step}"
    return i, {"starts": starts, "ends": ends}


def _clamp(v: int, dim: int) -> int:
    return min(max(v + dim if v < 0 else v, 0), dim)


def _channel_range(node: gs.Node, rank: int, dim: int):
    """(i, start, end, starts, ends) for a step-1 channel slice, (None, ...) when the slice
    leaves axis 1 alone, or a reason."""
    got = _slice_inputs(node, rank)
    if isinstance(got, str):
        return got
    i, c = got
    if i is None:
        return None, 0, dim, None, None
    s_raw, e_raw = int(c["starts"].reshape(-1)[i]), int(c["ends"].reshape(-1)[i])
    s, e = _clamp(s_raw, dim), _clamp(e_raw, dim)
    if e <= s:
        return f"Slice of no channels ({s_raw}:{e_raw} of {dim})"
    return i, s, e, c["starts"], c["ends"]


class SliceRule(Rule):
    """Slice along channels (step 1, constant bounds): the output carries the channels in
    the range, and channels outside it are not read here. The rewrite recomputes the bounds
    from the kept counts, keeping their form (from the start, from the end, open-ended)."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        x = node.inputs[0]
        shape = st.shape(x)
        if shape is None or len(shape) < 2:
            st.refuse(node, "Slice of unknown rank")
            return
        atoms = st.channels(x)
        got = _channel_range(node, len(shape), shape[1]) if shape[1] is not None else "Slice of unknown channels"
        if isinstance(got, str):
            st.refuse(node, got, "channels of a Slice the analysis does not follow")
            return
        i, s, e, _, _ = got
        if i is None or atoms is None:
            st.set_channels(node.outputs[0], atoms)
            return
        st.set_channels(node.outputs[0], atoms[s:e])
        st.nonempty(atoms[s:e])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        keep = ctx.keep(node.inputs[0])
        shape = ctx.shape(node.inputs[0])
        if keep is None or shape is None:
            return
        got = _channel_range(node, len(shape), len(keep))
        if isinstance(got, str) or got[0] is None:
            return
        i, s, e, starts, ends = got
        before, inside, after = int(keep[:s].sum()), int(keep[s:e].sum()), int(keep[e:].sum())
        if inside == 0:
            raise InternalError(f"Slice {node.name} would keep no channels")
        s_raw, e_raw = int(starts.reshape(-1)[i]), int(ends.reshape(-1)[i])
        dim = len(keep)
        if s_raw >= 0:
            new_s = before
        elif s_raw + dim <= 0:
            new_s = s_raw  # before the first channel: still clamps to 0
        else:
            new_s = -(inside + after)
        if e_raw >= dim:
            new_e = e_raw  # past the last channel (INT64_MAX, say): still clamps to the end
        elif e_raw >= 0 or after == 0:
            new_e = before + inside
        else:
            new_e = -after
        for index, values, old, new in ((1, starts, s_raw, new_s), (2, ends, e_raw, new_e)):
            if new != old:
                flat = values.reshape(-1).copy()
                flat[i] = new
                ctx.set_constant(node, index, flat.reshape(values.shape))
