"""Stage 4: stream calibration batches through onnxruntime and accumulate the
statistics that later stages need, per channel of each tensor.

For each requested tensor: the mean, the mean absolute value and the
second-moment matrix of its channels, pooled over the batch and pixels (a
flattened (N, C * P) tensor is viewed as (N, C, P) when asked to), as a full
matrix up to ``FULL_GRAM_LIMIT`` channels and the diagonal beyond. Means are
taken over every pixel; the second moments over at most ``GRAM_SAMPLES_PER_CHANNEL``
pixels per channel of each batch, spread evenly over its images and positions:
a (C, C) estimate needs a few times C samples, not the hundreds of thousands a
high-resolution map has, and its product would otherwise cost as much as the
layer that reads the map (a 1x1 conv: C x C' per pixel). Only
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
GRAM_SAMPLES_PER_CHANNEL = 64  # per batch: 8 batches of 32 images give 512 samples per channel
GRAM_MIN_SAMPLES = 4096  # per batch; narrow layers keep their whole batch up to this


@dataclass
class TensorStats:
    count: int = 0  # samples x pixels accumulated
    gram_count: int = 0  # of which the second moments saw
    sum: Optional[np.ndarray] = None
    abs_sum: Optional[np.ndarray] = None
    gram: Optional[np.ndarray] = None  # sum of x x^T (full) or of x^2 (diagonal, 1-D)
    gram_sum: Optional[np.ndarray] = None  # sum of x over the samples the Gram saw
    absolute: bool = True  # keep abs_sum (only the activation criterion reads it; it costs a pass)

    def add(self, x: np.ndarray) -> None:
        """``x``: (N, C, ...) for one batch. No transposed copy of a whole map is made: the sums run
        along its pixels in place, the second moments on a sample gathered as (samples, C)."""
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        p = x3.shape[2]
        if self.sum is None:
            self.sum, self.abs_sum, self.gram_sum = np.zeros(c), np.zeros(c), np.zeros(c)
            self.gram = np.zeros((c, c)) if c <= FULL_GRAM_LIMIT else np.zeros(c)
        self.count += n * p
        # float32 (pairwise) along the pixels of one image, float64 across images and batches
        self.sum += x3.sum(axis=2).sum(axis=0, dtype=np.float64)
        if self.absolute:
            self.abs_sum += np.abs(x3).sum(axis=2).sum(axis=0, dtype=np.float64)
        cap = max(GRAM_SAMPLES_PER_CHANNEL * c, GRAM_MIN_SAMPLES)
        if n * p > cap:
            # evenly spaced over images x pixels; the stride is not a whole number of pixels,
            # so every image contributes different positions
            image, pixel = np.divmod(np.linspace(0, n * p - 1, cap).astype(np.int64), p)
            sample = np.asarray(x3[image, :, pixel], dtype=np.float32)  # (cap, C)
        else:
            sample = np.ascontiguousarray(x3.transpose(0, 2, 1), dtype=np.float32).reshape(n * p, c)
        self.gram_count += sample.shape[0]
        self.gram_sum += sample.sum(axis=0, dtype=np.float64)
        if self.gram.ndim == 2:
            self.gram += sample.T @ sample
        else:
            self.gram += np.einsum("ij,ij->j", sample, sample, dtype=np.float64)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def mean_abs(self) -> np.ndarray:
        if not self.absolute:
            raise ValueError("mean |x| was not collected (collect_stats(..., absolute=True))")
        return self.abs_sum / self.count

    def second_moment(self) -> np.ndarray:
        """Uncentred E[x x^T] (or E[x^2] when only the diagonal is kept)."""
        return self.gram / self.gram_count

    def covariance(self) -> np.ndarray:
        """Centred second moments: a (C, C) matrix, or the (C,) variances when only the diagonal is kept.
        Centred on the mean of the samples the Gram saw, so that the estimate stays positive
        semi-definite."""
        mu = self.gram_sum / self.gram_count
        if self.gram.ndim == 2:
            return self.gram / self.gram_count - np.outer(mu, mu)
        return self.gram / self.gram_count - mu * mu


@dataclass
class ChannelStats:
    tensors: Dict[str, TensorStats] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]


def collect_stats(model: onnx.ModelProto, tensors: Dict[str, int], cal: CalibrationSet, indices: Sequence[int],
                  providers: List[str], progress: Progress = silent, label: str = "calibrating",
                  absolute: bool = False) -> ChannelStats:
    """``tensors``: name -> positions per channel (1, or the pixels of a flattened map).
    ``absolute``: also the mean |x| of each channel."""
    start = time.perf_counter()
    names = list(tensors)
    sess = make_session(expose(model, names), providers)
    stats = ChannelStats(tensors={n: TensorStats(absolute=absolute) for n in names})
    with progress(label, len(indices)) as update, blas_single_thread():
        for b, batch in enumerate(cal.batches(indices)):
            real = cal.real_count(b, indices)
            outs = run(sess, cal.spec.name, batch, names)
            for name, value in zip(names, outs):
                x = value[:real]
                if tensors[name] > 1:
                    x = x.reshape(x.shape[0], -1, tensors[name])
                with np.errstate(over="ignore", invalid="ignore"):  # reported below as one line, not as warnings
                    stats.tensors[name].add(x)
                # a NaN or infinity anywhere carries into the running sums (no pass of its own)
                if not np.isfinite(stats.tensors[name].sum).all():
                    raise InputError(f"the model computes NaN or infinite values at {name!r} on the calibration data")
            stats.images += real
            update(real)
    stats.seconds = time.perf_counter() - start
    return stats
