"""SNPFI's filter-wise interaction with the local payoff, in closed form.

Players are the channels of a group; a channel outside the coalition S is
replaced by its calibration mean (when recovery will fold that mean into the
next layer's bias) or by zero (when channels are simply removed), so that the
payoff describes what the pipeline will do. The payoff is minus the squared
error this causes in the outputs of the layers that consume the group:

    v(S) = -(1 - s)^T Q (1 - s),   s = indicator of S,

where Q[i, j] = E<W_i * z_i, W_j * z_j> sums, over consumers, the interaction
of the centred channels z_i, z_j through the consumer's weights, each
consumer's share divided by the variance of its output (so v is minus the sum
of the consumers' relative output errors). From
streamed second moments Q is, per consumer,

    Q_pos = M(x) (.) (F F^T) * pixels

with M the covariance (mean replacement) or the uncentred second moment
(zero replacement) of the consumer's input channels,

and F the consumer's per-input-channel weights (all outputs and taps). For
1x1 convs and fully connected layers this is exact; for k x k convs it keeps
the same-tap terms (the channel-level approximation), which needs only the
(C, C) channel covariance.

For a quadratic game the Shapley value has a closed form: phi_i = (Q 1)_i,
and the pairwise interaction index is -2 Q_ij. The utilisation curve of a
group is the payoff retained when its k most important channels are kept.

Which channels are the k most important is decided on the game itself, by
backward elimination: each step removes the channel whose removal, next to
those already removed, costs least (its own term plus twice its interactions
with them). The Shapley value averages a channel's marginal contribution over
every coalition; pruning meets one coalition, and where channels interact
strongly it is not the average one. With removed channels set to zero, every
post-ReLU channel shifts the consumer's output by its mean, and those shifts
add up: ranked by Shapley value, mnist_cnn without recovery kept 29.9% at -50%
FLOPs; eliminated on the interactions, 94.6% (bench/results). The Shapley
values stay the reported importances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import scipy.linalg.blas

from .analyse import Analysis
from .calibrate import ChannelStats
from .consumers import Consumer, find_consumers
from .refit import output_blocks


@dataclass
class GroupGame:
    players: np.ndarray  # global player ids, in group order
    q: np.ndarray  # (n, n) interaction matrix
    shapley: np.ndarray  # (n,)
    order: Optional[np.ndarray]  # positions in `players`, most important first (None: not ranked yet)
    loss: Optional[np.ndarray]  # (n + 1,) payoff lost when the k best are kept, in consumer-output variances

    def retained(self, k: int) -> float:
        return 1.0 - float(self.loss[k])


def _blocks(f: np.ndarray):
    """(C, out, taps) filters as float64 (C, n) blocks of whole outputs: together they are F,
    each channel's weights flattened, but no float64 (or reshaped) copy of all of it is made."""
    for block in output_blocks(f):
        yield f[:, block].reshape(f.shape[0], -1).astype(np.float64)


def filter_gram(f: np.ndarray, diagonal: bool = False) -> np.ndarray:
    """F F^T, or its diagonal, in float64."""
    c = f.shape[0]
    g = np.zeros(c) if diagonal else np.zeros((c, c))
    for block in _blocks(f):
        g += np.einsum("ij,ij->i", block, block) if diagonal else block @ block.T
    return g


def filter_factor(gram: np.ndarray) -> np.ndarray:
    """L (C, C) with L L^T = F F^T. In products that only ever meet F through F F^T, L stands
    in for F (C x all of a layer's weights per channel); keeping the factor rather than the
    Gram itself keeps the rounding of what follows at the level of working with F (see
    :func:`refit_games`). The Cholesky factor where the Gram is positive definite (a tenth of
    the time of an eigendecomposition); from the eigendecomposition where it is singular."""
    try:
        return np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        pass
    w, v = np.linalg.eigh(gram)
    return v * np.sqrt(np.maximum(w, 0.0))


def consumer_factor(consumer: Consumer, grams: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    """A factor of a consumer's F F^T with as few columns as exact: F itself, (C, out x taps)
    in float64, where the layer has fewer weights per channel than channels (a 1x1 conv that
    narrows, as MobileNets' projections do: rank out, not C), else the square L of
    :func:`filter_factor`. Every product in the refit payoff's elimination has one dimension of
    this size."""
    f = consumer.channel_filters()
    if f.shape[1] * f.shape[2] < f.shape[0]:
        return f.reshape(f.shape[0], -1).astype(np.float64)
    return filter_factor(_consumer_gram(consumer, grams))


def _consumer_gram(consumer: Consumer, grams: Optional[Dict[str, np.ndarray]]) -> np.ndarray:
    """F F^T of a consumer, once per consumer when ``grams`` is a cache shared between calls."""
    if grams is None:
        return filter_gram(consumer.channel_filters())
    if consumer.node.name not in grams:
        grams[consumer.node.name] = filter_gram(consumer.channel_filters())
    return grams[consumer.node.name]


def _channel_q(analysis: Analysis, consumer: Consumer, stats: ChannelStats, centred: bool,
               grams: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    s = stats[consumer.tensor]
    cov = s.covariance() if centred else s.second_moment()
    if cov.ndim == 1:  # only variances kept (very wide layers)
        return np.diag(cov * filter_gram(consumer.channel_filters(), diagonal=True)) * consumer.pixels(analysis)
    return cov * _consumer_gram(consumer, grams) * consumer.pixels(analysis)


def group_games(analysis: Analysis, stats: ChannelStats, centred: bool = True,
                grams: Optional[Dict[str, np.ndarray]] = None, ranked: bool = True) -> Dict[int, GroupGame]:
    """``centred``: channels outside a coalition take their mean (True) or zero (False).
    ``grams``: a cache of the consumers' F F^T, shared with :func:`refit_games`.
    ``ranked``: also order each group's channels and its loss curve (False when
    :func:`refit_games` will rank them: it does so where it can, and ranks the rest itself)."""
    q_by_group: Dict[int, np.ndarray] = {}
    members: Dict[int, np.ndarray] = {}
    for g in analysis.prunable_groups():
        players = np.flatnonzero(analysis.player_group == g.index)
        members[g.index] = players
        q_by_group[g.index] = np.zeros((len(players), len(players)))
    lookup = np.full(analysis.num_players, -1, dtype=np.int64)
    for players in members.values():
        lookup[players] = np.arange(len(players))
    for consumer in find_consumers(analysis):
        qp = _channel_q(analysis, consumer, stats, centred, grams)
        # in units of the consumer's own output variance, so that layers are comparable and a
        # group read by several layers (a residual stream) counts every reading
        energy = float(qp.sum())
        if not np.isfinite(energy) or energy <= 0:
            continue
        qp = qp / energy
        players = analysis.atom_player[consumer.channel_atoms(analysis)]
        groups = analysis.player_group[players]
        for g in np.unique(groups).tolist():
            if g not in q_by_group:
                continue
            pos = np.flatnonzero(groups == g)
            local = lookup[players[pos]]
            q = q_by_group[g]
            if len(pos) == len(qp) == len(q) and (local == np.arange(len(q))).all():
                q += qp  # the consumer reads exactly this group, in its order (the common case): no gathers
                continue
            block = qp[np.ix_(pos, pos)]
            if len(np.unique(local)) == len(local):
                q[np.ix_(local, local)] += block
            else:  # a player spans several positions: sum their interactions into its own
                np.add.at(q, (local[:, None], local[None, :]), block)
    games = {}
    for g, q in q_by_group.items():
        q = (q + q.T) / 2
        games[g] = GroupGame(members[g], q, q.sum(axis=1), None, None)
        if ranked:
            _rank_locally(games[g])
    return games


def _rank_locally(game: GroupGame) -> None:
    """The local game's own order (backward elimination on Q) and loss curve."""
    game.order = elimination_order(game.q)
    game.loss = loss_curve(game.q, game.order)


def elimination_order(q: np.ndarray) -> np.ndarray:
    """Positions most important first, by greedy backward elimination on v(S) = -(1 - s)^T Q (1 - s):
    removing channel i after the set R costs Q_ii + 2 sum_{j in R} Q_ij more; the cheapest goes
    first (ties: the later position). O(n^2) in all. ``q`` is symmetric (the games make it so):
    each step adds row i, contiguous, where column i would be read with a stride of n (MobileNetV1's
    7 groups, 1376 steps: 9.5 -> 3.2 ms; the same numbers, as row i is column i)."""
    n = len(q)
    cost = np.diag(q).astype(np.float64).copy()
    backwards = cost[::-1]  # a view: argmin on it finds the last of equal costs
    twice = np.empty(n)
    removed = np.empty(n, dtype=np.int64)
    for step in range(n):
        i = n - 1 - int(backwards.argmin())
        removed[step] = i
        np.multiply(q[i], 2.0, out=twice)
        cost += twice
        cost[i] = np.inf  # gone: stays infinite whatever is added later
    return removed[::-1].copy()


def loss_curve(q: np.ndarray, order: np.ndarray) -> np.ndarray:
    """loss[k] = 1_R^T Q 1_R with R the players outside the k best."""
    if len(order) == 0:
        return np.zeros(1)
    rev = np.ascontiguousarray(q[np.ix_(order[::-1], order[::-1])], dtype=np.float64)
    # tail[m] = sum of rev's leading m x m block (the m least important removed); growing the
    # block by row m adds that row's entries before the diagonal twice (q is symmetric) and the
    # diagonal once. Row sums of the lower triangle by BLAS (trmv on ones), which reads that
    # triangle in place: a masked copy of all of rev cost 70 ms of MobileNetV2's scoring. rev.T
    # is rev in Fortran order; its lower triangle holds rev[j, i] = rev[i, j], j <= i.
    lower = scipy.linalg.blas.dtrmv(rev.T, np.ones(len(rev)), lower=1)  # sum_{j <= i} rev[i, j]
    step = 2.0 * lower - np.diag(rev)
    tail = np.concatenate([[0.0], np.cumsum(step)])  # tail[m] for m removed
    return np.maximum(tail[::-1], 0.0)  # loss[k] has n - k removed


REFIT_GAME_LIMIT = 1024  # channels per group up to which the refit payoff is computed
ELIMINATION_SHARE = 64  # each elimination step drops 1/64 of the live channels (at least one)


def _eliminate(n: int, fits):
    """Greedy backward elimination over a group's ``n`` channels; ``fits``: per consumer, the
    positions it reads (``index``), its inverse Gram ``p`` and coefficients ``b`` on them, and
    the energy its costs are divided by. Returns the positions in the order removed and the
    cost charged to each.

    Each step drops the cheapest 1/ELIMINATION_SHARE of the live channels at once (one at a
    time once fewer than twice that many are left, where the most important channels are ordered),
    charges the batch its joint cost (the error it adds with all of it gone), shared in
    proportion to its members' own costs, and downdates every fit to the channels left. One
    at a time over full-size matrices cost n^3 per consumer; this is about 32 n^2.

    The downdate is written into P and B in place, one rank-r update each (a removed row and
    column of P, and row of B, become zero), and the arrays are only compacted to their live
    rows once half of them are dead. Copying the kept block out at every step, as before, made
    the refit payoff cost 1.25 s on MobileNetV2 at 224x224 (0.76 s with this alone), 0.55 s on
    ResNet-18 (0.41 s) and 130 ms on mobilenetv1_fmnist (89 ms), with the same orders and costs. Each
    fit finds a channel's row by lookup (``row``), not by a pass over boolean masks: the last
    2 x ELIMINATION_SHARE - 1 steps of every group remove one channel each, and there the
    fixed cost of each NumPy call is what a step costs.
    """
    alive = np.ones(n, dtype=bool)
    for fit in fits:
        _index_rows(fit, n)
    left = n
    removed, costs = [], []
    while left:
        cost = np.zeros(n)
        for fit in fits:
            p, b = fit["p"], fit["b"]
            diag = p.diagonal()  # zero on removed rows, which so cost nothing and are not candidates
            own = np.divide(np.einsum("ij,ij->i", b, b), diag, out=np.zeros(len(diag)), where=diag > 0)  # |B_j|^2 / P_jj
            cost[fit["index"]] += own / fit["energy"]
        take = max(1, left // ELIMINATION_SHARE)
        if take == 1:  # argmin: the first of equal costs, as the stable sort below
            cost[~alive] = np.inf
            batch = np.array([int(np.argmin(cost))])
        else:
            candidates = np.flatnonzero(alive)
            batch = candidates[np.argsort(cost[candidates], kind="stable")[:take]]
        joint = 0.0
        for fit in fits:
            r = fit["row"][batch]
            r = np.sort(r[r >= 0])
            if len(r):
                joint += _downdate(fit, r, n)
        own = np.maximum(cost[batch], 0.0)
        share = own / own.sum() if own.sum() > 0 else np.full(len(batch), 1.0 / len(batch))
        for j, c in zip(batch.tolist(), (max(joint, 0.0) * share).tolist()):
            removed.append(j)
            costs.append(c)
        alive[batch] = False
        left -= len(batch)
    return removed, costs


def _downdate(fit, r: np.ndarray, n: int) -> float:
    """Remove rows ``r`` of one fit's regression: P <- P - P_:r P_rr^-1 P_r:, B <- B - P_:r P_rr^-1 B_r
    (the Schur complement), in place. Returns the error this adds, in the fit's energy units."""
    p, b = fit["p"], fit["b"]
    m = len(p)
    if len(r) == 1 and p[r[0], r[0]] > 0:
        # one channel (every step of a group's one-at-a-time tail): a rank-one update, without
        # the general path's solve and BLAS calls, whose fixed costs outweighed its arithmetic
        j = int(r[0])
        d = float(p[j, j])
        pcol, b_j = p[:, j].copy(), b[j].copy()
        cost = float(b_j @ b_j) / d / fit["energy"]
        p -= np.multiply.outer(pcol, p[j] / d)
        b -= np.multiply.outer(pcol, b_j / d)
    else:
        prr = p[np.ix_(r, r)]
        rhs = np.hstack([p[r], b[r]])  # (r, m + k)
        try:
            solved = np.linalg.solve(prr, rhs)
        except np.linalg.LinAlgError:
            solved = np.linalg.pinv(prr) @ rhs
        cost = float((b[r] * solved[:, m:]).sum()) / fit["energy"]
        pcol = p[:, r]  # a copy (P is about to change); not P_r: transposed, which rounding makes differ
        _subtract_product(p, pcol, solved[:, :m])
        _subtract_product(b, pcol, solved[:, m:])
    p[r] = 0.0
    p[:, r] = 0.0
    b[r] = 0.0
    fit["row"][fit["index"][r]] = -1
    fit["live"] -= len(r)
    if 2 * fit["live"] <= m:  # compact to the live rows: the copy is paid for by the steps it saves
        keep = np.flatnonzero(fit["row"][fit["index"]] >= 0)
        fit["p"] = p[np.ix_(keep, keep)]
        fit["b"] = b[keep]
        fit["index"] = fit["index"][keep]
        _index_rows(fit, n)
    return cost


def _index_rows(fit, n: int) -> None:
    """``fit["row"]``: the row of each of the group's ``n`` positions in the fit's arrays (-1 where
    it reads none, or no longer); ``fit["live"]``: how many rows are left."""
    fit["row"] = np.full(n, -1, dtype=np.int64)
    fit["row"][fit["index"]] = np.arange(len(fit["index"]))
    fit["live"] = len(fit["index"])


def _subtract_product(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """c -= a @ b for float64 c, in place through BLAS (no temporary the size of c)."""
    # c (C order, as the fits keep P and B) is c.T in Fortran order: c.T -= b.T @ a.T by dgemm
    out = scipy.linalg.blas.dgemm(-1.0, b, a, beta=1.0, c=c.T, trans_a=1, trans_b=1, overwrite_c=1)
    if not np.shares_memory(out, c):  # any other layout: dgemm worked on a copy
        c[...] = out.T


def refit_games(analysis: Analysis, stats: ChannelStats, games: Dict[int, GroupGame],
                grams: Optional[Dict[str, np.ndarray]] = None) -> Dict[int, GroupGame]:
    """The refit payoff: channels interact through how well the kept ones stand in for the
    removed ones once the consumers are refitted, as recovery will do.

    v(S) = - sum over consumers of the error left in the consumer's output after a least-
    squares refit on the channels in S, in units of the output's variance. A channel that
    the others predict well is worth little here, however large its own contribution.
    There is no closed form for its Shapley values; channels are ranked by greedy backward
    elimination instead (repeatedly drop the channels whose removal costs least: for a
    regression with inverse Gram P and coefficients B, dropping j costs |B_j|^2 / P_jj,
    and P, B follow by a downdate; see :func:`_eliminate`), and the utilisation curve is
    the payoff along that path. Each group's ``shapley`` then holds the cost of each channel's removal.

    The costs depend on the consumers' weights F only through F F^T, so F (channels x all
    the consumer's weights) is replaced by a square factor L of F F^T (:func:`filter_factor`):
    the same arithmetic, with neither time nor memory growing with the size of the
    consumers (or F itself where it is narrower: :func:`consumer_factor`). (Carrying B B^T instead of B would be cheaper still, but its downdates
    cancel squared magnitudes, and the smallest costs, which decide the order, lost
    several digits in a test.)
    """
    factors: Dict[str, np.ndarray] = {}  # per consumer, computed once
    covs: Dict[str, np.ndarray] = {}  # per consumer input, computed once
    consumers = find_consumers(analysis)
    for g, game in games.items():
        players = game.players
        if len(players) > REFIT_GAME_LIMIT:
            continue  # the elimination is cubic in the group's size: keep the closed-form game
        local = {int(p): i for i, p in enumerate(players)}
        fits = []
        for consumer in consumers:
            s = stats[consumer.tensor]
            if s.gram.ndim != 2 or 8 * s.gram_count < s.gram.shape[0]:
                continue  # far fewer samples than channels: a regression on them would be noise
            found = analysis.atom_player[consumer.channel_atoms(analysis)]
            mine = np.flatnonzero(analysis.player_group[found] == g)
            if len(mine) == 0 or len(np.unique(found[mine])) != len(mine):
                continue
            if consumer.tensor not in covs:
                covs[consumer.tensor] = s.covariance()
            cov = covs[consumer.tensor]
            if consumer.node.name not in factors:
                factors[consumer.node.name] = consumer_factor(consumer, grams)
            f = factors[consumer.node.name] * np.sqrt(consumer.pixels(analysis))
            energy = float(np.einsum("ij,ik,jk->", cov, f, f, optimize=True))
            if not np.isfinite(energy) or energy <= 0:
                continue
            sigma = cov[np.ix_(mine, mine)]
            sigma = sigma + 1e-6 * max(float(np.mean(np.diag(sigma))), 1e-30) * np.eye(len(mine))
            try:
                p = np.linalg.inv(sigma)
            except np.linalg.LinAlgError:
                continue
            fits.append({"index": np.array([local[int(x)] for x in found[mine]]), "p": p,
                         "b": p @ (cov[mine] @ f), "energy": energy})
        if not fits:
            continue
        removed, costs = _eliminate(len(players), fits)
        cumulative = np.concatenate([[0.0], np.cumsum(costs)])  # after m removals
        game.order = np.array(removed[::-1])
        game.loss = cumulative[::-1].copy()  # loss[k]: all but the k best removed
        importance = np.zeros(len(players))
        importance[np.array(removed)] = costs
        game.shapley = importance
    for game in games.values():  # the groups left to the closed-form game keep its own ranking
        if game.order is None:
            _rank_locally(game)
    return games
