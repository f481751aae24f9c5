"""Measured latency before and after, because fewer FLOPs do not make a model faster by themselves.

For each batch size, several fresh sessions of each model are created in turn
(interleaved, so that drift in the machine's load hits both models alike),
each is warmed up and timed over repeated runs, and the median over sessions
of the per-session medians is reported. onnxruntime's thread spinning is off,
as for every session this project makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import onnx

from .runtime import make_session

SESSIONS = 3
MIN_RUNS, MAX_RUNS, MIN_SECONDS = 3, 30, 0.25


@dataclass
class Latency:
    batch: int
    before_ms: float
    after_ms: float

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms if self.after_ms > 0 else float("inf")


def time_session(sess, feed: dict, min_runs: int = MIN_RUNS, max_runs: int = MAX_RUNS,
                 min_seconds: float = MIN_SECONDS) -> float:
    """Median seconds of one run, after a warm-up: at least ``min_runs`` runs, more while
    under ``min_seconds`` and ``max_runs``."""
    sess.run(None, feed)  # warm-up: first runs allocate and pick kernels
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(before: onnx.ModelProto, after: onnx.ModelProto, input_name: str, sample: np.ndarray,
            batches: List[int], providers: List[str], after_sample: Optional[np.ndarray] = None) -> List[Latency]:
    """``sample``: one input (without the batch axis), repeated to each batch size; fed to both
    models, or to ``before`` only where ``after`` takes another shape (``after_sample``)."""
    def batched(x, batch):
        return {input_name: np.ascontiguousarray(np.repeat(x[None], batch, axis=0))}

    out = []
    for batch in batches:
        feeds = {"before": batched(sample, batch)}  # one copy for both models where they take the same
        feeds["after"] = feeds["before"] if after_sample is None else batched(after_sample, batch)
        per: Dict[str, List[float]] = {"before": [], "after": []}
        for _ in range(SESSIONS):
            for key, model in (("before", before), ("after", after)):
                per[key].append(time_session(make_session(model, providers, optimize=True), feeds[key]))
        out.append(Latency(batch, 1000 * float(np.median(per["before"])), 1000 * float(np.median(per["after"]))))
    return out
