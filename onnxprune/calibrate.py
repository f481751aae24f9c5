"""Stage 4: stream calibration batches through onnxruntime and accumulate the
statistics that later stages need, per channel of each tensor.

For each requested tensor: the mean, the mean absolute value and the
second-moment matrix of its channels, pooled over the batch and pixels (a
flattened (N, C * P) tensor is viewed as (N, C, P) when asked to), as a full
matrix up to ``FULL_GRAM_LIMIT`` channels and the diagonal beyond. Only
running sums in float64 are kept: memory grows with the batch and the channel
counts, never with the number of calibration images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx

from .data import CalibrationSet
from .errors import InputError
from .progress import Progress, silent
from .runtime import blas_single_thread, expose, make_session, run

FULL_GRAM_LIMIT = 4096


@dataclass
class TensorStats:
    count: int = 0  # samples x pixels accumulated
    sum: Optional[np.ndarray] = None
    abs_sum: Optional[np.ndarray] = None
    gram: Optional[np.ndarray] = None  # sum of x x^T (full) or of x^2 (diagonal, 1-D)

    def add(self, x: np.ndarray) -> None:
        # (C, samples x pixels); one batch's products in float32 (BLAS speed), summed across
        # batches in float64
        flat = np.ascontiguousarray(x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 0, 2), dtype=np.float32)
        flat = flat.reshape(x.shape[1], -1)
        if self.sum is None:
            c = x.shape[1]
            self.sum, self.abs_sum = np.zeros(c), np.zeros(c)
            self.gram = np.zeros((c, c)) if c <= FULL_GRAM_LIMIT else np.zeros(c)
        self.count += flat.shape[1]
        self.sum += flat.sum(axis=1, dtype=np.float64)
        self.abs_sum += np.abs(flat).sum(axis=1, dtype=np.float64)
        if self.gram.ndim == 2:
            self.gram += flat @ flat.T
        else:
            self.gram += (flat * flat).sum(axis=1, dtype=np.float64)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / self.count

    def second_moment(self) -> np.ndarray:
        """Uncentred E[x x^T] (or E[x^2] when only the diagonal is kept)."""
        return self.gram / self.count

    def covariance(self) -> np.ndarray:
        """Centred second moments: a (C, C) matrix, or the (C,) variances when only the diagonal is kept."""
        mu = self.mean
        if self.gram.ndim == 2:
            return self.gram / self.count - np.outer(mu, mu)
        return self.gram / self.count - mu * mu


@dataclass
class ChannelStats:
    tensors: Dict[str, TensorStats] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]


def collect_stats(model: onnx.ModelProto, tensors: Dict[str, int], cal: CalibrationSet, indices: Sequence[int],
                  providers: List[str], progress: Progress = silent, label: str = "calibrating") -> ChannelStats:
    """``tensors``: name -> positions per channel (1, or the pixels of a flattened map)."""
    start = time.perf_counter()
    names = list(tensors)
    sess = make_session(expose(model, names), providers)
    stats = ChannelStats(tensors={n: TensorStats() for n in names})
    with progress(label, len(indices)) as update, blas_single_thread():
        for b, batch in enumerate(cal.batches(indices)):
            real = cal.real_count(b, indices)
            outs = run(sess, cal.spec.name, batch, names)
            for name, value in zip(names, outs):
                x = value[:real]
                if tensors[name] > 1:
                    x = x.reshape(x.shape[0], -1, tensors[name])
                if not np.isfinite(x).all():
                    raise InputError(f"the model computes NaN or infinite values at {name!r} on the calibration data")
                stats.tensors[name].add(x)
            stats.images += real
            update(real)
    stats.seconds = time.perf_counter() - start
    return stats
