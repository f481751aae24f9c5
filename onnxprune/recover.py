"""Stage 7: refit the layers next to every cut so that they compute what they did.

Channel-level linear replacement: at each consumer's input, every removed
channel is regressed on the kept channels pixel by pixel,

    x_R ~ A x_K + b,   A = Cov_RK (Cov_KK + lambda I)^-1,   b = mean_R - A mean_K,

from the streamed first and second moments, and the regression is folded
into the consumer: the kept channels' weights absorb A^T W_R, the bias
absorbs W_R b. For 1x1 convs and fully connected layers this is exactly the
least-squares refit of the consumer's output over the kept channels; for
k x k convs it is the channel-level form (same-tap terms). A system that is
ill-conditioned falls back to folding the removed channels' means into the
bias alone, and the report says where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import scipy.linalg

from .analyse import Analysis
from .calibrate import ChannelStats
from .consumers import find_consumers

RIDGE = 1e-3  # relative to the mean variance of the kept channels


@dataclass
class RecoveryLog:
    refitted: List[str] = field(default_factory=list)
    mean_only: List[str] = field(default_factory=list)  # ill-conditioned: bias correction only


def regression(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray, ridge: float = RIDGE):
    """A (R x K) and b (R,) of the ridge regression of removed channels on kept ones, or None."""
    removed = ~kept
    if cov.ndim == 1:
        return None
    ckk = cov[np.ix_(kept, kept)]
    crk = cov[np.ix_(removed, kept)]
    scale = float(np.mean(np.diag(ckk))) if kept.any() else 0.0
    if not np.isfinite(scale) or scale <= 0:
        return None
    try:
        a = scipy.linalg.solve(ckk + ridge * scale * np.eye(len(ckk)), crk.T, assume_a="pos").T
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not np.isfinite(a).all():
        return None
    b = mean[removed] - a @ mean[kept]
    return a, b


def recover(analysis: Analysis, keep_player: np.ndarray, stats: ChannelStats, ridge: float = RIDGE) -> RecoveryLog:
    """Refit, in place in ``analysis.graph``, every consumer that loses input channels."""
    log = RecoveryLog()
    kept_atom = keep_player[analysis.atom_player]
    for consumer in find_consumers(analysis):
        atoms = consumer.channel_atoms(analysis)
        kept = kept_atom[atoms]
        if kept.all():
            continue
        s = stats[consumer.tensor]
        fit = regression(s.covariance(), s.mean, kept, ridge)
        f = consumer.channel_filters().astype(np.float64)
        f_removed = f[~kept]
        if fit is None:
            b = s.mean[~kept]
            log.mean_only.append(consumer.node.name)
        else:
            a, b = fit
            f[kept] += np.einsum("rk,rot->kot", a, f_removed)
            consumer.set_channel_filters(f)
            log.refitted.append(consumer.node.name)
        delta = np.einsum("rot,r->o", f_removed, b)
        out = consumer.node.outputs[0]
        consumer.rule.add_bias(consumer.node, delta, analysis.graph)
        if consumer.node.outputs[0] is not out:  # a bias node was inserted after the layer
            analysis.cmap[consumer.node.outputs[0].name] = analysis.cmap[out.name]
            analysis.shapes[consumer.node.outputs[0].name] = analysis.shapes[out.name]
    return log
