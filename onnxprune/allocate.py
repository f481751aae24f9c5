"""Stage 6: how many channels each group keeps so that the model meets the FLOPs target.

Within a group the highest-ranked players stay. Two allocations:

- uniform: every group keeps the same share (bisection on the share);
- auto: greedy, removing at each step the next unit of channels whose loss of
  retained payoff per FLOP saved is smallest, from each group's curve;
- threshold (the learned bottleneck): every group keeps its players whose gate
  is above one global threshold, found by bisection.

Both cost every candidate exactly with :class:`MacModel`, an incremental
form of the analysis's MAC count (so coupled groups, concatenations and
flatten mappings count as they will be written), then return channels to
the groups while the target still holds, so that the achieved reduction
lands just past the target rather than a rounding step beyond it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, List, Optional

import numpy as np

from .analyse import Analysis
from .errors import TargetError
from .ops import CountContext, rule_for
from .shapes import channel_count


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


class MacModel:
    """MACs as a function of which players are kept, updated incrementally.

    Every MAC rule is a product of a constant and the channel counts of the
    tensors it asks for; the counts are linear in the kept players.
    """

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        tensors: List[str] = []
        index: Dict[str, int] = {}
        self.base, self.factors = [], []
        for node in analysis.mac_nodes:
            asked: List[str] = []

            def count(name: str, asked: List[str] = asked) -> int:
                asked.append(name)
                return self._full(name)

            macs = rule_for(node.op, node.domain or "").macs(node, CountContext(analysis.shapes, count))
            asked = list(dict.fromkeys(asked))
            denom = 1
            for name in asked:
                denom *= self._full(name)
                if name not in index:
                    index[name] = len(tensors)
                    tensors.append(name)
            self.base.append(macs / denom if denom else 0.0)
            self.factors.append([index[n] for n in asked])
        self.base = np.asarray(self.base)
        self.tensors = tensors
        n_players = analysis.num_players
        self.per_player = np.zeros((len(tensors), n_players))
        self.fixed = np.zeros(len(tensors))
        for i, name in enumerate(tensors):
            atoms = analysis.cmap.get(name)
            if atoms is None:
                self.fixed[i] = self._full(name)
            else:
                self.per_player[i] = np.bincount(analysis.atom_player[atoms], minlength=n_players)
        width = max((len(f) for f in self.factors), default=0)
        # factor index table, -1 padded; a padded factor multiplies by one
        self.table = np.full((len(self.factors), max(width, 1)), -1, dtype=np.int64)
        for m, f in enumerate(self.factors):
            self.table[m, : len(f)] = f

    def _full(self, name: str) -> int:
        atoms = self.analysis.cmap.get(name)
        if atoms is not None:
            return len(atoms)
        return channel_count(self.analysis.shapes, name)

    def counts(self, keep: np.ndarray) -> np.ndarray:
        return self.fixed + self.per_player @ keep.astype(np.float64)

    def macs_of_counts(self, counts: np.ndarray) -> np.ndarray:
        """counts: (T,) or (T, K) for K candidates at once."""
        c = counts if counts.ndim == 2 else counts[:, None]
        padded = np.vstack([c, np.ones((1, c.shape[1]))])
        prod = np.prod(padded[self.table], axis=1)  # (M, K)
        total = self.base @ prod
        return total if counts.ndim == 2 else total[0]

    def macs(self, keep: np.ndarray) -> int:
        return int(round(self.macs_of_counts(self.counts(keep))))


def allowed_counts(n: int, round_to: int, narrow_unit: int = 0) -> np.ndarray:
    """The kept counts a group of ``n`` channels may have, ascending: multiples of ``round_to``
    in groups at least that wide (any count in narrower ones), and the whole group. With
    ``narrow_unit``, groups narrower than two ``round_to`` use multiples of it instead (so a
    16-channel group can still be halved when the block is 16)."""
    unit = round_to if round_to > 1 and n >= round_to else 1
    if narrow_unit > 1 and round_to <= n < 2 * round_to:
        unit = narrow_unit
    return np.array(sorted(set(range(unit, n + 1, unit)) | {n}), dtype=np.int64)


def _round_up(k: int, allowed: np.ndarray) -> int:
    """The smallest allowed count of at least k (the whole group when k exceeds them all)."""
    i = int(np.searchsorted(allowed, k, side="left"))
    return int(allowed[min(i, len(allowed) - 1)])


def _spaces_of_players(analysis: Analysis, players: np.ndarray) -> List[np.ndarray]:
    atom_player = analysis.atom_player
    lookup = {int(p): i for i, p in enumerate(players)}
    spaces: List[set] = [set() for _ in players]
    for atom in np.flatnonzero(np.isin(atom_player, players)):
        spaces[lookup[int(atom_player[atom])]].add(int(analysis.atom_space[atom]))
    return [np.array(sorted(s)) for s in spaces]


def essentials_first(analysis: Analysis, ranked: Dict[int, np.ndarray]):
    """Move forward, for every producer a group spans, its best channel: a group that ties
    several layers' outputs together (a Concat feeding a Squeeze-Excite gate, say) must not
    leave any of those layers with zero filters, whatever the ranking says. Returns the new
    rankings and, per group, how many leading players are essential. (Loss curves stay those
    of the criterion's order: the essential players are few and rank high anyway.)"""
    chosen: Dict[int, List[int]] = {}
    for g, players in ranked.items():
        spaces = _spaces_of_players(analysis, players)
        covered, essential = set(), []
        for i, sp in enumerate(spaces):
            if not set(sp.tolist()) <= covered:
                essential.append(i)
                covered |= set(sp.tolist())
        chosen[g] = essential
    _cover_regions(analysis, ranked, chosen)
    out, counts = {}, {}
    for g, players in ranked.items():
        essential = chosen[g]
        rest = [i for i in range(len(players)) if i not in set(essential)]
        out[g] = players[essential + rest]
        counts[g] = len(essential)
    return out, counts


def _cover_regions(analysis: Analysis, ranked: Dict[int, np.ndarray], chosen: Dict[int, List[int]]) -> None:
    """Make essential, for every region (a Split output, a channel Slice) that could lose all
    its channels, its best-ranked player: a tensor of zero channels is not a network."""
    if not analysis.regions:
        return
    rank_of = {}  # player -> (group, position in the group's ranking)
    for g, players in ranked.items():
        for i, p in enumerate(players.tolist()):
            rank_of[p] = (g, i)
    for region in analysis.regions:
        players = np.unique(analysis.atom_player[region]).tolist()
        if any(p not in rank_of for p in players):
            continue  # holds a player that is never pruned
        if any(rank_of[p][1] in chosen[rank_of[p][0]] for p in players):
            continue
        g, i = min((rank_of[p] for p in players), key=lambda gi: gi[1])
        chosen[g].append(i)


class _Planner:
    def __init__(self, analysis: Analysis, ranked: Dict[int, np.ndarray], min_keep: float, round_to: int,
                 essential: Optional[Dict[int, int]] = None, cost_model=None, narrow_unit: int = 0):
        self.analysis = analysis
        self.model = cost_model if cost_model is not None else MacModel(analysis)
        self.ranked = ranked  # group -> players, most important first
        self.size = {g: len(p) for g, p in ranked.items()}
        self.allowed = {g: allowed_counts(n, round_to, narrow_unit) for g, n in self.size.items()}
        essential = essential or {}
        self.floor = {g: self.round_up(g, max(1, essential.get(g, 1), math.ceil(min_keep * n - 1e-9)))
                      for g, n in self.size.items()}

    def round_up(self, g: int, k: int) -> int:
        return _round_up(k, self.allowed[g])

    def mask(self, kept: Dict[int, int]) -> np.ndarray:
        keep = np.ones(self.analysis.num_players, dtype=bool)
        for g, k in kept.items():
            keep[self.ranked[g][k:]] = False
        return keep

    def macs(self, kept: Dict[int, int]) -> int:
        return self.model.macs(self.mask(kept))

    def step_down(self, g: int, k: int) -> int:
        """The next smaller allowed count, or k if none is allowed (none above the floor)."""
        allowed = self.allowed[g]
        i = int(np.searchsorted(allowed, k, side="left"))
        nxt = int(allowed[i - 1]) if i > 0 else k
        return nxt if nxt >= self.floor[g] else k

    def step_up(self, g: int, k: int) -> int:
        allowed = self.allowed[g]
        i = int(np.searchsorted(allowed, k, side="right"))
        return int(allowed[i]) if i < len(allowed) else self.size[g]

    def uniform(self, t: float) -> Dict[int, int]:
        out = {}
        for g, n in self.size.items():
            k = self.round_up(g, int(math.ceil(n * (1.0 - t) - 1e-9)))
            out[g] = max(self.floor[g], k)
        return out


def _check_reachable(plan: _Planner, before: int, target: int, flops: float, what: str = "FLOPs") -> None:
    floor = dict(plan.floor)
    if plan.macs(floor) > target:
        best = 1.0 - plan.macs(floor) / before
        flag = "--flops" if what == "FLOPs" else "--latency"
        shown = math.floor(best * 1000) / 10  # rounded down: the share quoted can be asked for
        raise TargetError(
            f"{flag} {flops:g} cannot be reached: at most {shown:.1f}% of {what} can be removed "
            f"(with --min-keep, --round-to, --ignore and the channels that cannot be pruned)"
        )


def allocate(analysis: Analysis, ranked: Dict[int, np.ndarray], flops: float, min_keep: float, round_to: int,
             mode: str = "uniform", loss: Optional[Dict[int, np.ndarray]] = None,
             gates: Optional[Dict[int, np.ndarray]] = None, cost_model=None, rank_model=None,
             narrow_unit: int = 0, exhaustive: bool = True) -> Allocation:
    """``ranked``: per prunable group, its players most important first.
    ``loss`` (auto mode): per group, loss[k] = payoff lost when the k best are kept, loss[n] = 0.
    ``gates`` (threshold mode): per group, a gate (or any increasing function of it, such as its
    logit, which does not saturate) per player, in any order.
    ``cost_model``: what ``flops`` is a share of; MACs by default, or a
    :class:`onnxprune.latency_model.LatencyModel` for a latency target. The Allocation's
    ``macs_*`` fields are then in that model's units. ``exhaustive`` (auto mode): where the
    greedy steps and the trades land more than a point past the target, search every plan
    (:func:`_exact_plan`)."""
    ranked, essential = essentials_first(analysis, ranked)
    plan = _Planner(analysis, ranked, min_keep, round_to, essential, cost_model, narrow_unit)
    before = plan.model.macs(np.ones(analysis.num_players, dtype=bool))
    target = int(math.floor(before * (1.0 - flops)))
    _check_reachable(plan, before, target, flops, "FLOPs" if cost_model is None else "modelled latency")
    if mode == "uniform":
        kept = _uniform(plan, target)
    elif mode == "threshold":
        kept = _threshold(plan, target, gates)
    else:
        kept = _greedy(plan, target, loss, rank_model)
    kept = _give_back(plan, kept, target, loss)
    tolerance = int(math.floor(before * 0.01))
    kept = _close_gap(plan, kept, target, tolerance, loss)
    if mode == "auto" and exhaustive and target - plan.macs(kept) > tolerance:
        kept = _exact_plan(plan, target, tolerance, loss) or kept
    return Allocation(plan.mask(kept), kept, before, plan.macs(kept), target)


def _uniform(plan: _Planner, target: int) -> Dict[int, int]:
    lo, hi = 0.0, 1.0  # macs(uniform(lo)) > target >= macs(uniform(hi))
    for _ in range(40):
        mid = (lo + hi) / 2
        if plan.macs(plan.uniform(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return plan.uniform(hi)


def _threshold(plan: _Planner, target: int, gates: Dict[int, np.ndarray]) -> Dict[int, int]:
    """The smallest global gate threshold whose kept counts (rounded up to the unit, never
    under a group's floor) meet the target. Counts fall as the threshold rises."""

    def kept_at(t: float) -> Dict[int, int]:
        return {g: max(plan.floor[g], plan.round_up(g, int(np.count_nonzero(gates[g] > t))))
                for g in plan.size}

    values = np.concatenate([v for v in gates.values()]) if gates else np.zeros(1)
    # macs(kept_at(lo)) > target >= macs(kept_at(hi)): all kept at lo, only the (reachable) floors at hi
    lo, hi = float(values.min()) - 1.0, float(values.max()) + 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if plan.macs(kept_at(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return kept_at(hi)


def _greedy(plan: _Planner, target: int, loss: Dict[int, np.ndarray], rank_model=None) -> Dict[int, int]:
    """``rank_model``: a cost model (same counts) whose savings price each step instead of the
    target's own; the target still decides when to stop."""
    model = plan.model
    groups = sorted(plan.size)
    kept = dict(plan.size)
    keep = np.ones(plan.analysis.num_players, dtype=bool)
    counts = model.counts(keep)
    current = model.macs_of_counts(counts)
    current_rank = rank_model.macs_of_counts(counts) if rank_model is not None else None
    while current > target:
        cands, deltas, dloss = [], [], []
        for g in groups:
            nk = plan.step_down(g, kept[g])
            if nk == kept[g]:
                continue
            removed = plan.ranked[g][nk:kept[g]]
            cands.append((g, nk, removed))
            deltas.append(model.per_player[:, removed].sum(axis=1))
            dloss.append(float(loss[g][nk] - loss[g][kept[g]]))
        if not cands:
            break
        trial = counts[:, None] - np.stack(deltas, axis=1)
        saved = current - model.macs_of_counts(trial)
        priced = saved
        if rank_model is not None:
            rank_after = rank_model.macs_of_counts(trial)
            priced = current_rank - rank_after
        cost = np.asarray(dloss) / np.maximum(priced, 1e-12)
        # a step that saves nothing (measured latency is flat between some widths) is taken only
        # when no step saves anything, and then the one that loses least, so the search goes on
        flat = (priced <= 0) | (saved <= 0)
        cost[flat] = 1e300 * (1.0 + np.asarray(dloss)[flat] / (1.0 + max(dloss)))
        best = int(np.argmin(cost))
        if not np.isfinite(cost[best]):
            break
        g, nk, removed = cands[best]
        kept[g] = nk
        keep[removed] = False
        counts = trial[:, best]
        current = current - saved[best]
        if rank_model is not None:
            current_rank = rank_after[best]
    return kept


def _close_gap(plan: _Planner, kept: Dict[int, int], target: int, tolerance: int,
               loss: Optional[Dict[int, np.ndarray]] = None) -> Dict[int, int]:
    """Where pruning steps are coarse (small groups), the reduction can overshoot the target
    by more than the tolerance with no single step to give back. Trade steps of some groups
    for steps of others until the gap is within the tolerance or no trade narrows it.

    With ``loss``, each round first looks for the trade of single steps (:func:`_cheapest_trade`)
    that lands within the tolerance losing least payoff, and takes it; otherwise it takes the
    trade of a step or two of one group for up to three of another that lands closest under
    the target, and goes on."""

    def moved(g: int, k: int, steps: int) -> int:
        for _ in range(abs(steps)):
            k = plan.step_up(g, k) if steps > 0 else plan.step_down(g, k)
        return k

    current = plan.macs(kept)
    while target - current > tolerance:
        if loss is not None:
            traded = _cheapest_trade(plan, kept, target, tolerance, loss)
            if traded is not None:
                return traded
        best, best_macs = None, current
        for up in kept:
            for i in (1, 2):
                k_up = moved(up, kept[up], i)
                if k_up == kept[up]:
                    continue
                for down in kept:
                    for j in (1, 2, 3):
                        k_down = moved(down, kept[down], -j)
                        if down == up or k_down == kept[down]:
                            continue
                        trial = dict(kept)
                        trial[up], trial[down] = k_up, k_down
                        m = plan.macs(trial)
                        if best_macs < m <= target:
                            best, best_macs = trial, m
        if best is None:
            break
        kept, current = best, best_macs
    return kept


TRADE_CANDIDATES = 8  # single steps up and down that :func:`_cheapest_trade` combines, each way


def _cheapest_trade(plan: _Planner, kept: Dict[int, int], target: int, tolerance: int,
                    loss: Dict[int, np.ndarray]) -> Optional[Dict[int, int]]:
    """The trade of one group's step up for another's step down, or of two for one either way,
    that lands within ``tolerance`` under the target and loses least payoff; None if none does.

    Every move is a single step, where a group's loss curve says most: trades that moved a
    group two or three steps at once, chosen for landing closest to the target, cost
    fmnist_resnet at -30% 0.92 points where this costs 0.60 (bench/results/*-accuracy.md),
    and the cheapest of them by payoff (a residual group cut from 48 channels to 16) was
    worse still on the test set. The steps combined are the TRADE_CANDIDATES ups that return
    most payoff per MAC and downs that lose least, so the search stays small in wide models."""
    before = plan.macs(kept)
    ups, downs = [], []
    for g, k in kept.items():
        k_up, k_down = plan.step_up(g, k), plan.step_down(g, k)
        if k_up != k:
            trial = dict(kept)
            trial[g] = k_up
            added = plan.macs(trial) - before
            ups.append((-(loss[g][k] - loss[g][k_up]) / max(added, 1), g, k_up))
        if k_down != k:
            trial = dict(kept)
            trial[g] = k_down
            saved = before - plan.macs(trial)
            downs.append(((loss[g][k_down] - loss[g][k]) / max(saved, 1), g, k_down))
    ups = sorted(ups)[:TRADE_CANDIDATES]
    downs = sorted(downs)[:TRADE_CANDIDATES]
    best, best_loss = None, math.inf
    for n_up, n_down in ((1, 1), (2, 1), (1, 2)):
        for up in combinations(ups, n_up):
            for down in combinations(downs, n_down):
                moves = {g: k for _, g, k in up + down}
                if len(moves) < n_up + n_down:
                    continue  # one group moved both ways
                trial = {**kept, **moves}
                m = plan.macs(trial)
                if target - tolerance <= m <= target:
                    lost = sum(float(loss[g][k]) for g, k in trial.items())
                    if lost < best_loss:
                        best, best_loss = trial, lost
    return best


EXACT_PLAN_LIMIT = 1 << 18  # plans up to which a missed target is searched for exhaustively
EXACT_CHUNK = 1 << 14  # plans costed at once


def _exact_plan(plan: _Planner, target: int, tolerance: int,
                loss: Dict[int, np.ndarray]) -> Optional[Dict[int, int]]:
    """Of all plans (every allowed count of every group, none under its floor), the one that
    lands within ``tolerance`` under the target losing least payoff; None if none does or there
    are more than EXACT_PLAN_LIMIT plans.

    Run only where the greedy steps and the trades missed the window: few, coarse groups (a
    small network at a --round-to as wide as its groups allow), where a plan that lands can
    sit several steps of several groups away from the greedy one. The counts are linear in each group's
    kept count, so every plan's channel counts are a sum of one column per group, and all of a
    chunk's MACs come from one vectorised product."""
    model = plan.model
    groups = sorted(plan.size)
    options = {g: [int(k) for k in plan.allowed[g] if k >= plan.floor[g]] for g in groups}
    total = 1
    for g in groups:
        total *= max(len(options[g]), 1)
        if total > EXACT_PLAN_LIMIT:
            return None
    full = model.counts(np.ones(plan.analysis.num_players, dtype=bool))
    removed, lost = {}, {}
    for g in groups:  # per option, the counts it takes away and the payoff it loses
        removed[g] = np.stack([model.per_player[:, plan.ranked[g][k:]].sum(axis=1) for k in options[g]], axis=1)
        lost[g] = np.array([float(loss[g][k]) for k in options[g]])
    best, best_loss, best_macs = None, math.inf, -1.0
    for start in range(0, total, EXACT_CHUNK):
        index = np.arange(start, min(start + EXACT_CHUNK, total))
        counts = np.repeat(full[:, None], len(index), axis=1)
        lost_here = np.zeros(len(index))
        digits = {}
        rest = index
        for g in groups:  # mixed radix: each plan's option per group
            digits[g] = rest % len(options[g])
            rest = rest // len(options[g])
            counts -= removed[g][:, digits[g]]
            lost_here += lost[g][digits[g]]
        macs = model.macs_of_counts(counts)
        fits = np.flatnonzero((macs <= target) & (macs >= target - tolerance))
        if len(fits) == 0:
            continue
        # least payoff lost; of equal losses, the plan nearest the target
        i = fits[np.lexsort((-macs[fits], lost_here[fits]))[0]]
        if (lost_here[i], -macs[i]) < (best_loss, -best_macs):
            best_loss, best_macs = float(lost_here[i]), float(macs[i])
            best = {g: options[g][int(digits[g][i])] for g in groups}
    if best is not None and plan.macs(best) > target:  # rounding in the vectorised sum
        return None
    return best


def _give_back(plan: _Planner, kept: Dict[int, int], target: int, loss: Optional[Dict[int, np.ndarray]]) -> Dict[int, int]:
    """Return channels, most valuable first, while the target still holds."""
    changed = True
    while changed:
        changed = False
        if loss is not None:
            order = sorted(kept, key=lambda g: -(loss[g][kept[g]] - loss[g][plan.step_up(g, kept[g])]))
        else:
            order = sorted(kept, key=lambda g: (kept[g] / plan.size[g], g))
        for g in order:
            if kept[g] >= plan.size[g]:
                continue
            trial = dict(kept)
            trial[g] = plan.step_up(g, kept[g])
            if plan.macs(trial) <= target:
                kept = trial
                changed = True
    return kept
