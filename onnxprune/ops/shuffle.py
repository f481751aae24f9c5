"""Channel shuffle (ShuffleNet v1/v2): Reshape (N, C, ...) -> (N, g, C/g, ...), Transpose
perm (0, 2, 1, ...), Reshape back to (N, C, ...). Output channel j*g + i is input channel
i*(C/g) + j, a fixed permutation the analysis follows.

For the pruned graph to be the same shuffle of g equal parts with fewer channels, every part
must keep the same channels: channel j of each part is one player (as channel i of every
group of a grouped conv is). The Reshape targets then spell the kept count per part.

The three nodes are recognised together from any one of them. The two intermediate tensors
carry no channel map: they must be read by the next node of the pattern only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .base import ChannelState, Rule, Shape, attr, const, opt_input, prod

ShapeOf = Callable[[gs.Tensor], Optional[Shape]]


@dataclass
class Shuffle:
    first: gs.Node  # Reshape (N, C, ...) -> (N, g, C/g, ...)
    transpose: gs.Node  # perm (0, 2, 1, ...)
    last: gs.Node  # Reshape -> (N, C, ...)
    groups: int  # g: the number of parts
    per_group: int  # C / g: channels per part


def _producer(tensor: gs.Tensor, op: str) -> Optional[gs.Node]:
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and node.op == op else None


def _static(shape: Optional[Shape]) -> bool:
    return shape is not None and len(shape) >= 2 and None not in shape[1:]


def _splits_channels(node: gs.Node, shape: ShapeOf) -> Optional[Tuple[int, int]]:
    """(g, C/g) when this Reshape turns (N, C, *S) into (N, g, C/g, *R), g and C/g >= 2."""
    if node.op != "Reshape":
        return None
    x, y = shape(node.inputs[0]), shape(node.outputs[0])
    if not (_static(x) and _static(y)) or len(x) < 2 or len(y) < 3 or x[0] != y[0]:
        return None
    g, per = y[1], y[2]
    if g < 2 or per < 2 or g * per != x[1] or prod(y[3:]) != prod(x[2:]):
        return None
    return g, per


def _target_problem(node: gs.Node, moving: Collection[int]) -> Optional[str]:
    """Why this Reshape's target cannot be rewritten, or None. ``moving``: positions whose
    size changes with pruning, in the input or the output; a 0 ("copy the input's size")
    there would copy a stale or wrong size."""
    target = const(opt_input(node, 1))
    if target is None:
        return f"{node.name}'s target shape is computed at run time"
    if attr(node, "allowzero", 0):
        return f"{node.name} has allowzero set"
    zeros = [int(p) for p in np.flatnonzero(target.reshape(-1) == 0) if int(p) in moving]
    if zeros:
        return f"{node.name}'s target copies a channel axis (0 at position {zeros[0]})"
    return None


def _sole_reader(tensor: gs.Tensor, op: str, outputs: Collection[str]) -> Optional[gs.Node]:
    if tensor.name in outputs or len(tensor.outputs) != 1 or tensor.outputs[0].op != op:
        return None
    return tensor.outputs[0]


def find_shuffle(node: gs.Node, shape: ShapeOf,
                 outputs: Collection[str] = ()) -> Tuple[Optional[Shuffle], Optional[str]]:
    """The channel shuffle that ``node`` (a Reshape or Transpose) belongs to, or None.

    The second value is a reason when ``node`` splits the channel axis into (g, C/g) but
    what follows is not a channel shuffle the analysis can rewrite; None when ``node`` is
    not such a split at all (then other rules apply)."""
    first = node
    if node.op == "Transpose":
        first = _producer(node.inputs[0], "Reshape")
    elif node.op == "Reshape" and _splits_channels(node, shape) is None:
        transpose = _producer(node.inputs[0], "Transpose")
        first = _producer(transpose.inputs[0], "Reshape") if transpose is not None else None
    if first is None or _splits_channels(first, shape) is None:
        return None, None
    sh, why = _follow(first, shape, outputs)
    if sh is None:
        return None, (why if node is first else None)
    return (sh, None) if any(node is n for n in (sh.first, sh.transpose, sh.last)) else (None, None)


def _follow(first: gs.Node, shape: ShapeOf, outputs: Collection[str]) -> Tuple[Optional[Shuffle], Optional[str]]:
    g, per = _splits_channels(first, shape)
    split = shape(first.outputs[0])
    head = f"{first.name} splits the {g * per} channels into {g} x {per}, but this is no channel shuffle: "
    transpose = _sole_reader(first.outputs[0], "Transpose", outputs)
    if transpose is None:
        return None, head + "its output is not read by one Transpose only"
    perm = attr(transpose, "perm")
    swap = [0, 2, 1] + list(range(3, len(split)))
    if perm is None or list(perm) != swap:
        return None, head + f"{transpose.name} has perm {None if perm is None else list(perm)}, not {swap}"
    last = _sole_reader(transpose.outputs[0], "Reshape", outputs)
    if last is None:
        return None, head + f"{transpose.name}'s output is not read by one Reshape only"
    y = shape(last.outputs[0])
    if not _static(y) or y[0] != split[0] or y[1] != g * per or prod(y[2:]) != prod(split[3:]):
        return None, head + f"{last.name} does not make the channel axis whole again (shape {y})"
    for node in (first, last):
        problem = _target_problem(node, (1, 2))
        if problem:
            return None, head + problem
    return Shuffle(first, transpose, last, g, per), None


def follow_shuffle(node: gs.Node, st: ChannelState) -> bool:
    """Propagate for a Reshape or Transpose of a channel shuffle; False if ``node`` is in none."""
    sh, why = find_shuffle(node, st.shape, st.graph_outputs)
    if sh is None:
        if why is None:
            return False
        st.refuse(node, why, f"channels split by {node.op} outside a channel shuffle")
        return True
    if node is sh.last:
        parts = st.tie_parts(st.channels(sh.first.inputs[0]), sh.groups)  # channel j of every part goes together
        st.set_channels(node.outputs[0], parts.T.reshape(-1).copy())
    elif node is sh.first:
        st.channels(node.inputs[0])
    return True


class TransposeRule(Rule):
    """A Transpose that keeps axes 0 and 1 passes channels through; the one of a channel
    shuffle is followed with its Reshapes; any other moves the channel axis and blocks."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        if follow_shuffle(node, st):
            return
        shape = st.shape(node.inputs[0])
        perm = attr(node, "perm")
        if shape is not None and perm is None:
            perm = list(range(len(shape)))[::-1]
        if shape is not None and len(shape) >= 2 and list(perm[:2]) == [0, 1]:
            st.set_channels(node.outputs[0], st.channels(node.inputs[0]))
            return
        why = (f"Transpose with perm {None if perm is None else list(perm)} moves the channel axis (of "
               "transposes only a channel shuffle, Reshape (N, g, C/g, ...) -> perm (0, 2, 1, ...) -> Reshape "
               "(N, C, ...), is followed)")
        st.refuse(node, why, "Transpose that moves the channel axis")
