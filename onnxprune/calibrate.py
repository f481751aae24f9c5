"""Stage 4: stream calibration batches through onnxruntime and accumulate
per-channel statistics of the tensors that later stages need.

Only running sums are kept: memory grows with the batch and the tensors'
channel counts, never with the number of calibration images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import onnx

from .data import CalibrationSet
from .errors import InputError
from .progress import Progress, silent
from .runtime import expose, make_session, run


@dataclass
class ChannelStats:
    """Per position along axis 1 of each tensor, averaged over batch and pixels."""

    mean: Dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: Dict[str, np.ndarray] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0


def collect_stats(model: onnx.ModelProto, tensors: Sequence[str], cal: CalibrationSet, indices: Sequence[int],
                  providers: List[str], progress: Progress = silent) -> ChannelStats:
    start = time.perf_counter()
    names = list(dict.fromkeys(tensors))
    sess = make_session(expose(model, names), providers)
    sums: Dict[str, np.ndarray] = {}
    abs_sums: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    seen = 0
    with progress("calibrating", len(indices)) as update:
        for b, batch in enumerate(cal.batches(indices)):
            real = cal.real_count(b, indices)
            outs = run(sess, cal.spec.name, batch, names)
            for name, value in zip(names, outs):
                x = np.asarray(value[:real], dtype=np.float64)
                if not np.isfinite(x).all():
                    raise InputError(f"the model computes NaN or infinite values at {name!r} on the calibration data")
                flat = x.reshape(x.shape[0], x.shape[1], -1)
                sums[name] = sums.get(name, 0.0) + flat.sum(axis=(0, 2))
                abs_sums[name] = abs_sums.get(name, 0.0) + np.abs(flat).sum(axis=(0, 2))
                counts[name] = counts.get(name, 0) + flat.shape[0] * flat.shape[2]
            seen += real
            update(real)
    stats = ChannelStats(images=seen, seconds=time.perf_counter() - start)
    for name in names:
        if name in sums:
            stats.mean[name] = sums[name] / counts[name]
            stats.mean_abs[name] = abs_sums[name] / counts[name]
    return stats
