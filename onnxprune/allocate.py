"""Stage 6: how many channels each group keeps so that the model meets the FLOPs target.

Counts are turned into masks by keeping each group's highest-scoring players,
and every candidate is costed exactly with the analysis's MAC counter, so
coupled groups and flatten mappings are accounted for as they will be written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from .analyse import Analysis
from .errors import TargetError


@dataclass
class Allocation:
    keep_player: np.ndarray  # bool per player
    kept: Dict[int, int]  # prunable group index -> channels kept
    macs_before: int
    macs_after: int
    target_macs: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before


def _round_up(k: int, n: int, unit: int) -> int:
    if unit > 1 and n >= unit:
        k = int(math.ceil(k / unit) * unit)
    return min(n, k)


class _Planner:
    def __init__(self, analysis: Analysis, scores: np.ndarray, min_keep: float, round_to: int):
        self.analysis = analysis
        self.groups = analysis.prunable_groups()
        self.round_to = round_to
        self.ranked: Dict[int, np.ndarray] = {}
        self.floor: Dict[int, int] = {}
        pg = analysis.player_group
        for g in self.groups:
            players = np.flatnonzero(pg == g.index)
            # highest score first; ties broken by position, so runs are deterministic
            order = np.lexsort((players, -scores[players]))
            self.ranked[g.index] = players[order]
            self.floor[g.index] = _round_up(max(1, math.ceil(min_keep * g.size - 1e-9)), g.size, round_to)

    def mask(self, kept: Dict[int, int]) -> np.ndarray:
        keep = np.ones(self.analysis.num_players, dtype=bool)
        for g, k in kept.items():
            keep[self.ranked[g][k:]] = False
        return keep

    def macs(self, kept: Dict[int, int]) -> int:
        return self.analysis.macs(self.mask(kept))

    def uniform(self, t: float) -> Dict[int, int]:
        """Every group keeps the same share 1 - t, subject to its floor and rounding."""
        out = {}
        for g in self.groups:
            k = _round_up(int(math.ceil(g.size * (1.0 - t) - 1e-9)), g.size, self.round_to)
            out[g.index] = max(self.floor[g.index], k)
        return out


def allocate_uniform(analysis: Analysis, scores: np.ndarray, flops: float, min_keep: float, round_to: int) -> Allocation:
    plan = _Planner(analysis, scores, min_keep, round_to)
    before = analysis.macs()
    target = int(math.floor(before * (1.0 - flops)))
    floor = plan.uniform(1.0)
    if plan.macs(floor) > target:
        best = 1.0 - plan.macs(floor) / before
        raise TargetError(
            f"--flops {flops:g} cannot be reached: at most {best:.1%} of FLOPs can be removed "
            f"(with --min-keep, --ignore and the channels that cannot be pruned)"
        )
    lo, hi = 0.0, 1.0  # macs(uniform(lo)) > target >= macs(uniform(hi))
    for _ in range(40):
        mid = (lo + hi) / 2
        if plan.macs(plan.uniform(mid)) <= target:
            hi = mid
        else:
            lo = mid
    kept = plan.uniform(hi)
    kept = _give_back(plan, kept, target)
    return Allocation(plan.mask(kept), kept, before, plan.macs(kept), target)


def _give_back(plan: _Planner, kept: Dict[int, int], target: int) -> Dict[int, int]:
    """Return channels to the most-pruned groups while the target still holds, so that
    the reduction lands just past the target rather than a rounding step beyond it."""
    sizes = {g.index: g.size for g in plan.groups}
    changed = True
    while changed:
        changed = False
        for g in sorted(kept, key=lambda i: (kept[i] / sizes[i], i)):
            if kept[g] >= sizes[g]:
                continue
            trial = dict(kept)
            trial[g] = min(sizes[g], kept[g] + (plan.round_to if sizes[g] >= plan.round_to else 1))
            if plan.macs(trial) <= target:
                kept = trial
                changed = True
    return kept
