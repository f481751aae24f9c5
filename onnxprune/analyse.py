"""Stage 3: find the channel groups and which of them can be pruned.

The op registry does the per-op work; this module walks the graph in
topological order, then turns atom classes into players and connected
producers into groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UsageError
from .ops import MAC_OPS, ChannelState, CountContext, rule_for
from .shapes import Shape, channel_count


@dataclass
class ChannelGroup:
    """Channels that must be removed together, one player per coupled channel set."""

    index: int
    producers: List[str]  # nodes whose output channels these are
    players: List[np.ndarray]  # atom ids of each player
    prunable: bool
    reasons: List[str] = field(default_factory=list)  # why not prunable

    @property
    def size(self) -> int:
        return len(self.players)

    @property
    def name(self) -> str:
        return self.producers[0] if len(self.producers) == 1 else f"{self.producers[0]} (+{len(self.producers) - 1} coupled)"


@dataclass
class Analysis:
    graph: gs.Graph
    shapes: Dict[str, Shape]
    cmap: Dict[str, np.ndarray]  # tensor name -> atom id per position on axis 1
    atom_player: np.ndarray  # atom -> global player index
    player_group: np.ndarray  # player -> group index
    groups: List[ChannelGroup]
    mac_nodes: List[gs.Node]
    spaces: list  # ops.base.Space per block of atoms
    atom_space: np.ndarray  # atom -> index into spaces
    regions: List[np.ndarray] = field(default_factory=list)  # atom sets that must each keep a channel

    @property
    def num_players(self) -> int:
        return len(self.player_group)

    def prunable_groups(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def keep_fn(self, keep_player: Optional[np.ndarray]):
        """tensor name -> boolean mask over its axis 1, or None when nothing of it goes."""
        if keep_player is None:
            return lambda name: None
        kept_atom = keep_player[self.atom_player]

        def keep(name: str) -> Optional[np.ndarray]:
            atoms = self.cmap.get(name)
            if atoms is None:
                return None
            mask = kept_atom[atoms]
            return None if mask.all() else mask

        return keep

    def macs(self, keep_player: Optional[np.ndarray] = None) -> int:
        """Multiply-accumulates per sample if the players in ``keep_player`` are kept."""
        kept_atom = None if keep_player is None else keep_player[self.atom_player]

        def count(name: str) -> int:
            atoms = self.cmap.get(name)
            if atoms is not None:
                return int(kept_atom[atoms].sum()) if kept_atom is not None else len(atoms)
            return channel_count(self.shapes, name)

        ctx = CountContext(self.shapes, count)
        return sum(rule_for(n.op, n.domain or "").macs(n, ctx) for n in self.mac_nodes)

    def prunable_share(self) -> float:
        """Share of the MACs in layers that a prunable group's channels enter or leave."""
        total = self.macs() or 1
        full = CountContext(self.shapes, self._full_count)
        prunable = np.array([g.prunable for g in self.groups])
        touched = 0
        for n in self.mac_nodes:
            for t in list(n.inputs[:1]) + list(n.outputs[:1]):
                atoms = self.cmap.get(t.name)
                if atoms is not None and prunable[self.player_group[self.atom_player[atoms]]].any():
                    touched += rule_for(n.op, n.domain or "").macs(n, full)
                    break
        return touched / total

    def _full_count(self, name: str) -> int:
        return channel_count(self.shapes, name)

    def group_macs(self) -> Dict[int, int]:
        """MACs of the layers that each group's channels enter or leave."""
        out: Dict[int, int] = {}
        ctx = CountContext(self.shapes, self._full_count)
        for n in self.mac_nodes:
            m = rule_for(n.op, n.domain or "").macs(n, ctx)
            touched = set()
            for t in list(n.inputs[:1]) + list(n.outputs[:1]):
                atoms = self.cmap.get(t.name)
                if atoms is not None and len(atoms):
                    touched.update(np.unique(self.player_group[self.atom_player[atoms]]).tolist())
            for g in touched:
                out[g] = out.get(g, 0) + m
        return out


def analyse(graph: gs.Graph, shapes: Dict[str, Shape], opset: int, ignore: Sequence[str] = ()) -> Analysis:
    st = ChannelState(shapes, opset, [t.name for t in graph.outputs])
    graph.toposort()
    nodes = list(graph.nodes)
    for t in graph.inputs:
        st.channels(t)  # graph inputs: channels nobody may prune
    for node in nodes:
        rule_for(node.op, node.domain or "").propagate(node, st)
    for t in graph.outputs:
        st.block(st.channels(t), _Named(t.name, "output"), "reaches a graph output")
    _block_ignored(st, nodes, ignore)
    return _build(graph, shapes, st, nodes)


class _Named:
    def __init__(self, name: str, op: str):
        self.name, self.op = name, op


def _block_ignored(st: ChannelState, nodes: Iterable[gs.Node], ignore: Sequence[str]) -> None:
    wanted = set(ignore)
    found = set()
    for node in nodes:
        if node.name in wanted:
            found.add(node.name)
            for t in list(node.inputs) + list(node.outputs):
                if t.name in st.cmap:
                    st.block(st.cmap[t.name], node, "left whole by --ignore")
        # a tensor counts where it carries channels (a weight's name does not name a layer)
        found.update(t.name for t in list(node.inputs) + list(node.outputs) if t.name in wanted and t.name in st.cmap)
    for name, atoms in st.cmap.items():
        if name in wanted:
            st.block(atoms, _Named(name, "tensor"), "left whole by --ignore")
    missing = [n for n in ignore if n not in found]
    if missing:
        # a typo would otherwise prune the layer the user meant to keep
        raise UsageError(f"--ignore {missing[0]!r}: no node, and no tensor carrying channels, of that name in "
                         "the model as analysed "
                         "(BatchNormalization and constant-folded nodes are merged into the layer before "
                         "them: name that layer; onnxprune IN --analyze lists the groups)")


def _build(graph: gs.Graph, shapes, st: ChannelState, nodes) -> Analysis:
    n_atoms = len(st.parent)
    roots = np.array([st.find(a) for a in range(n_atoms)], dtype=np.int64)
    atom_space = np.asarray(st.atom_space, dtype=np.int64)

    # spaces tied through any atom class form one group
    n_spaces = len(st.spaces)
    space_parent = list(range(n_spaces))

    def sfind(s: int) -> int:
        while space_parent[s] != s:
            space_parent[s] = space_parent[space_parent[s]]
            s = space_parent[s]
        return s

    for a in range(n_atoms):
        x, y = sfind(atom_space[a]), sfind(atom_space[roots[a]])
        if x != y:
            space_parent[max(x, y)] = min(x, y)

    # players are atom classes, numbered in order of their smallest atom (deterministic)
    unique_roots, atom_player = np.unique(roots, return_inverse=True)
    group_of_space_root: Dict[int, int] = {}
    player_group = np.empty(len(unique_roots), dtype=np.int64)
    for p, r in enumerate(unique_roots.tolist()):
        sr = sfind(atom_space[r])
        if sr not in group_of_space_root:
            group_of_space_root[sr] = len(group_of_space_root)
        player_group[p] = group_of_space_root[sr]

    n_groups = len(group_of_space_root)
    players: List[List[np.ndarray]] = [[] for _ in range(n_groups)]
    order = np.argsort(atom_player, kind="stable")
    splits = np.cumsum(np.bincount(atom_player, minlength=len(unique_roots)))[:-1]
    for p, atoms in enumerate(np.split(order, splits)):
        players[player_group[p]].append(atoms)

    producers: List[List[str]] = [[] for _ in range(n_groups)]
    reasons: List[List[str]] = [[] for _ in range(n_groups)]
    for s, space in enumerate(st.spaces):
        if sfind(s) not in group_of_space_root:
            continue  # a tensor of no channels (an empty Slice, say) has no atoms, so no group
        g = group_of_space_root[sfind(s)]
        if space.node not in producers[g]:
            producers[g].append(space.node)
        if not space.prunable:
            reasons[g].append(f"{space.node} ({space.op}): {space.reason}")
    for atoms, node, op, reason in st.blocks:
        for g in np.unique(player_group[atom_player[atoms]]).tolist():
            text = f"{node} ({op}): {reason}"
            if text not in reasons[g]:
                reasons[g].append(text)

    groups = [
        ChannelGroup(index=g, producers=producers[g], players=players[g], prunable=not reasons[g], reasons=reasons[g])
        for g in range(n_groups)
    ]
    mac_nodes = [n for n in nodes if n.op in MAC_OPS and (n.domain or "") in ("", "ai.onnx")]
    return Analysis(graph=graph, shapes=shapes, cmap=dict(st.cmap), atom_player=atom_player,
                    player_group=player_group, groups=groups, mac_nodes=mac_nodes,
                    spaces=list(st.spaces), atom_space=atom_space, regions=list(st.regions))
