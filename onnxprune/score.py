"""Stage 5: how much each channel (player) matters. Higher is more important."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .analyse import Analysis
from .calibrate import ChannelStats
from .consumers import find_consumers
from .ops import rule_for

NEEDS_STATS = ("activation", "snpfi")


def _per_player(analysis: Analysis, values_of):
    """Sum over each player's producing layers of ``values_of(node)`` (one value per output
    channel, or None), and which players had any value."""
    nodes = {n.name: n for n in analysis.graph.nodes}
    atom_value = np.zeros(len(analysis.atom_player))
    covered = np.zeros(len(analysis.atom_player))
    starts = sorted({s.start for s in analysis.spaces} | {len(analysis.atom_player)})
    size = dict(zip(starts, np.diff(starts).tolist()))  # atoms are made space after space
    for space in analysis.spaces:
        node = nodes.get(space.node)
        if node is None or not space.prunable:
            continue
        values = values_of(node)
        if values is None or not size.get(space.start):
            continue
        n_atoms = size[space.start]
        if len(values) != n_atoms:
            if len(values) % n_atoms:
                continue
            # a grouped conv's output j is atom j % n_atoms (its filters tied across the groups)
            values = np.asarray(values).reshape(-1, n_atoms).sum(axis=0)
        atom_value[space.start:space.start + len(values)] = values
        covered[space.start:space.start + len(values)] = 1.0
    n = analysis.num_players
    return (np.bincount(analysis.atom_player, weights=atom_value, minlength=n),
            np.bincount(analysis.atom_player, weights=covered, minlength=n) > 0)


def _bn_scales(analysis: Analysis, bn_scale: Dict[str, np.ndarray]):
    """Sum over each player's producing convs of the |gamma| of the BatchNormalization folded
    into them, and which players had any."""
    return _per_player(analysis, lambda node: bn_scale.get(node.outputs[0].name) if node.outputs else None)


def _filter_norms(analysis: Analysis, order: int) -> np.ndarray:
    """Sum over each player's producing filters of their L1 or L2 norm."""

    def norms(node):
        filters = rule_for(node.op, node.domain or "").filters(node)
        if filters is None:
            return None
        f = np.asarray(filters, dtype=np.float64)
        return np.abs(f).sum(axis=1) if order == 1 else np.sqrt((f * f).sum(axis=1))

    return _per_player(analysis, norms)[0]


def score_players(analysis: Analysis, criterion: str, stats: Optional[ChannelStats] = None, seed: int = 0,
                  bn_scale: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    if criterion == "bn-scale":
        # groups without any folded BatchNormalization are ranked by their filters' L1 norms,
        # each group on its own scale (the allocation reads shares within a group)
        scales, covered = _bn_scales(analysis, bn_scale or {})
        l1 = _filter_norms(analysis, 1)
        for g in analysis.prunable_groups():
            players = np.flatnonzero(analysis.player_group == g.index)
            if not covered[players].any():
                scales[players] = l1[players]
        return scales
    if criterion == "l1":
        return _filter_norms(analysis, 1)
    if criterion == "l2":
        return _filter_norms(analysis, 2)
    if criterion == "random":
        return np.random.default_rng(seed).random(analysis.num_players)
    if criterion == "activation":
        # mean |activation| of each channel where consumers read it, averaged over readings
        total = np.zeros(analysis.num_players)
        count = np.zeros(analysis.num_players)
        for consumer in find_consumers(analysis):
            players = analysis.atom_player[consumer.channel_atoms(analysis)]
            total += np.bincount(players, weights=stats[consumer.tensor].mean_abs, minlength=analysis.num_players)
            count += np.bincount(players, minlength=analysis.num_players)
        return total / np.maximum(count, 1)
    raise ValueError(f"unknown criterion {criterion!r}")
