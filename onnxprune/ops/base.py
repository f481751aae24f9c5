"""What every op rule works with.

Channel tracking: every tensor whose axis 1 carries channels gets a *channel
map*, an array of atom ids, one per position along axis 1. A producer (a
Conv's filters) creates fresh atoms; ops that keep channels apart pass the
map through; ops that tie channels together (a residual Add) union atoms;
Concat concatenates maps; Flatten repeats each atom once per pixel; Split
and Slice along channels take a range of the map; a channel shuffle permutes
it. Atoms that end up in one union-find class are one *player*: pruned
together, from every tensor and parameter that carries them. Atoms that reach
something the analysis does not understand are *blocked*, with the op and the
reason. A *region* is a set of atoms of which at least one must be kept (a
Split output or a Slice of zero channels is not a network).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..load import free_name

Shape = Tuple[Optional[int], ...]


@dataclass
class Space:
    """A block of fresh atoms made by one node (or a graph input)."""

    node: str
    op: str
    prunable: bool  # False where nobody knows how to remove its channels
    reason: Optional[str] = None
    start: int = 0  # first atom id; atom start + i is the node's output channel i


class ChannelState:
    """Analysis state that the rules read and write while walking the graph."""

    def __init__(self, shapes: Dict[str, Shape], opset: int, outputs: Sequence[str] = ()):
        self.shapes = shapes
        self.opset = opset
        self.graph_outputs = set(outputs)  # tensor names the graph returns
        self.regions: List[np.ndarray] = []  # atom sets that must each keep a channel
        self.parent: List[int] = []
        self.atom_space: List[int] = []
        self.spaces: List[Space] = []
        self.cmap: Dict[str, np.ndarray] = {}
        self.blocks: List[Tuple[np.ndarray, str, str, str]] = []  # atoms, node, op, reason

    # -- atoms -------------------------------------------------------------
    def fresh(self, count: int, node: gs.Node, prunable: bool = True, reason: Optional[str] = None) -> np.ndarray:
        start = len(self.parent)
        self.spaces.append(Space(node.name, node.op, prunable, reason, start))
        space = len(self.spaces) - 1
        self.parent.extend(range(start, start + count))
        self.atom_space.extend([space] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def nonempty(self, atoms: Optional[np.ndarray]) -> None:
        """At least one of ``atoms`` must be kept (a tensor that may not lose all its channels)."""
        if atoms is not None and len(atoms):
            self.regions.append(np.unique(atoms))

    def tie_parts(self, atoms: np.ndarray, parts: int) -> np.ndarray:
        """Split ``atoms`` into ``parts`` equal parts and make channel j of every part one
        player (grouped convs, channel shuffles); returns the (parts, per part) view."""
        split = atoms.reshape(parts, -1)
        for k in range(1, parts):
            self.union(split[0], split[k])
        return split

    def refuse(self, node: gs.Node, why: str, made: Optional[str] = None) -> None:
        """A node the analysis cannot follow: its inputs' groups block with ``why`` and its
        outputs are channels nobody can prune (``made`` says why, default ``why``)."""
        self.block_inputs(node, why)
        self.opaque_outputs(node, made or why)

    def block(self, atoms: Optional[np.ndarray], node: gs.Node, reason: str) -> None:
        if atoms is not None and len(atoms):
            self.blocks.append((np.unique(atoms), node.name, node.op, reason))

    # -- tensors -----------------------------------------------------------
    def shape(self, tensor: gs.Tensor) -> Optional[Shape]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.values.shape)
        return self.shapes.get(tensor.name)

    def channels(self, tensor: gs.Tensor) -> Optional[np.ndarray]:
        """The channel map of a tensor; tensors nobody mapped get blocked atoms."""
        if tensor.name in self.cmap:
            return self.cmap[tensor.name]
        shape = self.shape(tensor)
        if shape is None or len(shape) < 2 or shape[1] is None:
            return None
        atoms = self.fresh(shape[1], _Origin(tensor), prunable=False,
                           reason="channels made by an op or input the analysis does not follow")
        self.cmap[tensor.name] = atoms
        return atoms

    def set_channels(self, tensor: gs.Tensor, atoms: Optional[np.ndarray]) -> None:
        if atoms is not None:
            self.cmap[tensor.name] = atoms

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        """Block what the node reads: its inputs, and what its subgraphs (If branches, Loop
        bodies) read from around them, which no rule follows there either."""
        for t in node.inputs:
            if not isinstance(t, gs.Constant) and t.name:
                self.block(self.channels(t), node, reason)
        for t in _subgraph_reads(node):
            self.block(self.cmap.get(t.name), node, f"read inside a subgraph of {node.op}")

    def opaque_outputs(self, node: gs.Node, reason: str) -> None:
        for t in node.outputs:
            shape = self.shape(t)
            if shape is not None and len(shape) >= 2 and shape[1] is not None:
                self.cmap[t.name] = self.fresh(shape[1], node, prunable=False, reason=reason)


class _Origin:
    """Stands in for a node when a tensor's producer is unknown (graph inputs)."""

    def __init__(self, tensor: gs.Tensor):
        producer = tensor.inputs[0] if tensor.inputs else None
        self.name = producer.name if producer is not None else tensor.name
        self.op = producer.op if producer is not None else "input"


class RewriteContext:
    """What a rule may ask while it slices a node's parameters."""

    def __init__(self, shapes: Dict[str, Shape], keep: Callable[[str], Optional[np.ndarray]],
                 set_constant: Callable[[gs.Node, int, np.ndarray], None], opset: int,
                 set_attr: Callable[[gs.Node, str, object], None]):
        self.shapes = shapes
        self.opset = opset
        self._keep = keep
        self._set_constant = set_constant
        self._set_attr = set_attr

    def shape(self, tensor: gs.Tensor) -> Optional[Shape]:
        """Shape before pruning."""
        if tensor.name in self.shapes:
            return self.shapes[tensor.name]
        return tuple(tensor.values.shape) if isinstance(tensor, gs.Constant) else None

    def keep(self, tensor: gs.Tensor) -> Optional[np.ndarray]:
        """Boolean mask over axis 1 of ``tensor``, or None if nothing of it goes."""
        return self._keep(tensor.name)

    def set_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Make input ``index`` a constant holding ``values`` (appending the input if absent)."""
        self._set_constant(node, index, values)

    def set_attr(self, node: gs.Node, name: str, value) -> None:
        """Set an attribute (None deletes it); the node counts as changed."""
        self._set_attr(node, name, value)


class CountContext:
    """Shapes and (possibly pruned) channel counts for MAC counting."""

    def __init__(self, shapes: Dict[str, Shape], count: Callable[[str], int]):
        self.shapes = shapes
        self._count = count

    def shape(self, tensor: gs.Tensor) -> Optional[Shape]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.values.shape)
        return self.shapes.get(tensor.name)

    def count(self, tensor: gs.Tensor) -> int:
        """Channels on axis 1 of ``tensor`` after pruning."""
        return self._count(tensor.name)


class Rule:
    """How one op type moves, couples or consumes channels."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        st.refuse(node, f"{node.op} is not understood by the channel analysis",
                  f"channels made by {node.op}, which the analysis does not follow")

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        """Slice this node's parameters and fix its attributes (default: nothing)."""

    def macs(self, node: gs.Node, ctx: CountContext) -> int:
        """Multiply-accumulates per sample (0 for ops outside the FLOPs convention)."""
        return 0

    def filters(self, node: gs.Node) -> Optional[np.ndarray]:
        """The weights of each output channel this node makes, as (channels, fan_in)."""
        return None

    def input_filters(self, node: gs.Node) -> Optional[np.ndarray]:
        """For a layer that sums over its input channels: the weights each input channel
        is multiplied by, as (in_channels, out_channels, taps). None for other ops
        (including depthwise convs, which pass channels through)."""
        return None

    def set_input_filters(self, node: gs.Node, filters: np.ndarray) -> None:
        """Write back weights in the layout :meth:`input_filters` returned."""
        raise NotImplementedError(node.op)

    def add_bias(self, node: gs.Node, delta: np.ndarray, graph: gs.Graph) -> None:
        """Add ``delta`` (one value per output channel) to the layer's bias."""
        raise NotImplementedError(node.op)

    def bias(self, node: gs.Node) -> Optional[np.ndarray]:
        """The bias the layer adds, one float64 value per output channel (zeros where its bias
        input is empty); None where the op has no bias of its own (add_bias then adds a node
        after it)."""
        raise NotImplementedError(node.op)

    def output_pixels(self, node: gs.Node, shape) -> int:
        """How many times each weight is applied per sample (output pixels of a conv)."""
        return 1

    def tap_share(self, node: gs.Node) -> float:
        """The share of a layer's taps (the last axis of :meth:`input_filters`) that one output
        pixel receives, on average over the output: a constant input c of a channel moves the
        output by this times the sum of that channel's taps times c. 1 where every output sums
        over all the taps (dense layers, the interior of a conv)."""
        return 1.0

    def resized(self, node: gs.Node, cin: Optional[int], cout: Optional[int]) -> Optional[Resized]:
        """This layer with ``cin`` input and ``cout`` output channels (None: as it is), for
        timing it alone at other widths; None where that is not a plain layer of this rule."""
        return None


@dataclass
class Resized:
    cin: int
    cout: int
    weight_shape: Tuple[int, ...]
    attrs: Dict[str, object]  # attributes that change with the widths


# -- helpers shared by several rules -------------------------------------------

def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def const(tensor: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def _subgraph_reads(node: gs.Node) -> List[gs.Tensor]:
    """The tensors a node's subgraphs, at any depth, read from the scopes around them."""
    graphs = list(node.subgraphs(recursive=True))
    made = {t.name for g in graphs for t in g.inputs} | {t.name for g in graphs for n in g.nodes for t in n.outputs}
    reads = {t.name: t for g in graphs for n in g.nodes for t in n.inputs if t.name and t.name not in made}
    return list(reads.values())


def opt_input(node: gs.Node, index: int) -> Optional[gs.Tensor]:
    if len(node.inputs) > index and node.inputs[index].name:
        return node.inputs[index]
    return None


def channel_axis_of_param(param_shape: Sequence[int], out_rank: int) -> Optional[int]:
    """Axis of a broadcast parameter that lines up with axis 1 of a rank-``out_rank`` tensor."""
    axis = len(param_shape) - (out_rank - 1)
    return axis if 0 <= axis < len(param_shape) else None


def fresh_name(graph: gs.Graph, base: str) -> str:
    """``base``, or ``base_<k>``: a name no tensor of ``graph`` has."""
    return free_name(base, set(graph.tensors()))


def add_to_bias_input(node: gs.Node, index: int, delta: np.ndarray, dtype, graph: gs.Graph) -> None:
    """Add ``delta`` to the bias held in input ``index``, creating the input if absent (under a
    name no tensor of ``graph`` has: a separate BiasAdd's constant is often named "<layer>_bias")."""
    if len(node.inputs) > index and node.inputs[index].name:
        bias = node.inputs[index]
        new = (bias.values.astype(np.float64) + delta.reshape(bias.values.shape)).astype(bias.values.dtype)
        if len(bias.outputs) > 1:
            node.inputs[index] = gs.Constant(fresh_name(graph, f"{bias.name}_{node.name}"), new)
        else:
            bias.values = new
    else:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(gs.Constant(fresh_name(graph, f"{node.name}_bias"), delta.astype(dtype)))


def bias_input(node: gs.Node, index: int, outputs: int) -> np.ndarray:
    """The constant bias in input ``index`` as ``outputs`` float64 values (zeros if absent)."""
    c = opt_input(node, index)
    if c is None or const(c) is None:
        return np.zeros(outputs)
    return np.broadcast_to(np.asarray(const(c), np.float64).reshape(-1), (outputs,)).copy()


def prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def axes_of(node: gs.Node, input_index: int):
    """Axes from the attribute (older opsets) or a constant input (newer ones): a list, None
    when the node has none, or "missing" when they are computed at run time."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    t = opt_input(node, input_index)
    if t is None:
        return None
    value = const(t)
    return "missing" if value is None else value.reshape(-1).tolist()


def normalise_axes(axes, rank: int) -> List[int]:
    return sorted(int(a) % rank for a in axes)
