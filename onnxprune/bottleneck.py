"""The learned bottleneck: choose channels by optimising one gate per player under the FLOPs target.

Each player p of a prunable group gets a gate lambda_p = sigmoid(alpha_p) that
scales its centred activation (lambda x + (1 - lambda) mean, so a closed gate
is the channel replaced by its calibration mean, as recovery will treat it).
The network's weights stay frozen; only alpha is optimised, by Adam, on

    L = fidelity + beta * |soft FLOPs / FLOPs - (1 - R)| + gamma * mean(lambda (1 - lambda))

- fidelity is the local quadratic payoff of :mod:`onnxprune.snpfi`: the relative
  error the gates cause in the outputs of the layers that read each group,
  (1 - lambda)^T Q (1 - lambda) per group, averaged over the layers reading
  prunable groups. It is exact for 1x1 convs and fully connected consumers and
  keeps the same-tap terms for k x k convs.
- soft FLOPs are the exact MAC count of :class:`onnxprune.allocate.MacModel`
  with the kept-player indicator replaced by the gates: a polynomial in lambda
  (products of the channel counts each layer reads and writes).

Why this route to gradients: onnxruntime inference gives none, and the
published method back-propagates a cross-entropy through the whole network.
The quadratic payoff summarises every calibration image in the streamed
second moments the pipeline already has, so the loss and its gradient are
closed-form NumPy (no extra forward passes, no autodiff, no framework), and
each step is deterministic and costs O(sum of group sizes squared + layers).
What it gives up: interactions between groups through the rest of the network
beyond the next layer, which recovery then refits.

The gates rank channels within each group; how many each group keeps comes from
one global threshold on the gates, found by bisection in
:func:`onnxprune.allocate.allocate` (``mode="threshold"``) so that the counted
FLOPs of the written model meet the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from .allocate import MacModel
from .analyse import Analysis
from .snpfi import GroupGame


@dataclass
class GateSettings:
    steps: int = 1000
    lr: float = 0.5
    flops_weight: float = 8.0  # beta
    binary_weight: float = 0.25  # gamma
    init: float = 3.0  # alpha at the start: gates at sigmoid(3) = 0.95, nearly open


@dataclass
class GateResult:
    gates: Dict[int, np.ndarray]  # prunable group -> gate per player, in game.players order
    logits: Dict[int, np.ndarray]  # the same as alpha (gates saturate at 1.0 in float; logits do not)
    soft_flops_ratio: float  # soft FLOPs / FLOPs with the final gates
    fidelity_loss: float
    binary_share: float  # gates below 0.1 or above 0.9 at the end
    history: list  # (step, fidelity, soft FLOPs ratio) every tenth of the run


class SoftFlops:
    """FLOPs of a MacModel with real-valued kept indicators, and their gradient."""

    def __init__(self, model: MacModel):
        self.model = model
        self.full = float(model.macs_of_counts(model.counts(np.ones(model.per_player.shape[1]))))

    def value_and_grad(self, keep: np.ndarray):
        m = self.model
        counts = m.counts(keep)
        padded = np.concatenate([counts, [1.0]])
        vals = padded[m.table]  # (M, W); padded factors read the trailing one
        total = float(m.base @ np.prod(vals, axis=1))
        grad_counts = np.zeros(len(padded))
        for w in range(m.table.shape[1]):
            others = np.prod(np.delete(vals, w, axis=1), axis=1)
            np.add.at(grad_counts, m.table[:, w], m.base * others)
        return total, m.per_player.T @ grad_counts[:-1]


def learn_gates(analysis: Analysis, games: Dict[int, GroupGame], flops: float,
                settings: GateSettings = GateSettings()) -> GateResult:
    """Optimise the gates of every prunable group so the soft FLOPs reach ``1 - flops`` of the model's."""
    soft = SoftFlops(MacModel(analysis))
    groups = sorted(games)
    players = np.concatenate([games[g].players for g in groups]) if groups else np.zeros(0, dtype=np.int64)
    spans, start = {}, 0
    for g in groups:
        spans[g] = slice(start, start + len(games[g].players))
        start += len(games[g].players)
    # each group's Q is in units of its readers' output variances, so sum(Q) over all groups is
    # about the number of layers reading them: divide by it, and the fidelity term is the mean
    # relative output error of those layers (1 with every gate closed)
    total = sum(float(games[g].q.sum()) for g in groups)
    q = {g: games[g].q / max(total, 1e-30) for g in groups}
    goal = 1.0 - flops
    alpha = np.full(len(players), settings.init)
    m1, m2 = np.zeros_like(alpha), np.zeros_like(alpha)
    b1, b2, eps = 0.9, 0.999, 1e-8
    keep = np.ones(analysis.num_players)
    history = []
    fid = ratio = 0.0
    for step in range(1, settings.steps + 1):
        lam = 1.0 / (1.0 + np.exp(-alpha))
        grad = np.zeros_like(alpha)
        fid = 0.0
        for g in groups:
            u = 1.0 - lam[spans[g]]
            qu = q[g] @ u
            fid += float(u @ qu)
            grad[spans[g]] -= 2.0 * qu
        keep[players] = lam
        macs, dflops = soft.value_and_grad(keep)
        ratio = macs / soft.full
        grad += settings.flops_weight * np.sign(ratio - goal) * dflops[players] / soft.full
        grad += settings.binary_weight * (1.0 - 2.0 * lam) / max(len(lam), 1)
        grad *= lam * (1.0 - lam)
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        alpha -= settings.lr * (m1 / (1 - b1 ** step)) / (np.sqrt(m2 / (1 - b2 ** step)) + eps)
        if step % max(settings.steps // 10, 1) == 0:
            history.append((step, fid, ratio))
    lam = 1.0 / (1.0 + np.exp(-alpha))
    return GateResult(
        gates={g: lam[spans[g]].copy() for g in groups},
        logits={g: alpha[spans[g]].copy() for g in groups},
        soft_flops_ratio=float(ratio),
        fidelity_loss=float(fid),
        binary_share=float(np.mean((lam < 0.1) | (lam > 0.9))) if len(lam) else 1.0,
        history=history,
    )
