"""Where a conversion's onnxruntime time goes: every session it makes, timed.

    python bench/session_costs.py MODEL.onnx [--device cpu|cuda|mixed] [--images 256] [--repeat 1]

Runs the default conversion (-50%, latency off) of MODEL, a 224x224 RGB network with a
dynamic batch axis, on random images, and prints per onnxprune function that made sessions:
how many, the seconds spent creating them, in their first runs and in their other runs.
``recover.py:__init__`` is the refit's capture (a run of the original, its targets exposed).
``--device mixed`` runs the refit's and verification's sessions on the CPU and the others (the
statistics among them) on the CUDA provider. On the CUDA provider a first run includes cuDNN's choice of kernels for
the shape it meets (bench/shape_costs.py). Results: bench/results/2026-11-22-scale-cost-cuda.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# per maker: sessions, seconds creating them, seconds in first runs, later runs, seconds in those
costs = collections.defaultdict(lambda: [0, 0.0, 0.0, 0, 0.0])
_Session = ort.InferenceSession


def _maker() -> str:
    """The onnxprune function (outside runtime.py) on the stack that makes the session."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if os.sep + "onnxprune" + os.sep in frame.filename and not frame.filename.endswith("runtime.py"):
            return f"{os.path.basename(frame.filename)}:{frame.name}"
    return "?"


class TimedSession(_Session):
    def __init__(self, *args, **kwargs):
        self._maker, self._first = _maker(), True
        start = time.perf_counter()
        super().__init__(*args, **kwargs)
        entry = costs[self._maker]
        entry[0] += 1
        entry[1] += time.perf_counter() - start

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        out = super().run(*args, **kwargs)
        seconds, entry = time.perf_counter() - start, costs[self._maker]
        if self._first:
            entry[2] += seconds
            self._first = False
        else:
            entry[3] += 1
            entry[4] += seconds
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--device", choices=("cpu", "cuda", "mixed"), default="cpu")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    ort.InferenceSession = TimedSession  # before onnxprune makes any session
    import onnxprune
    from onnxprune import recover, runtime, verify

    device = args.device
    if device == "mixed":
        def on_cpu(model, providers, *rest, **kwargs):
            return runtime.make_session(model, ["CPUExecutionProvider"], *rest, **kwargs)

        recover.make_session = verify.make_session = on_cpu
        device = "cuda"
    images = np.random.default_rng(0).random((args.images, 3, 224, 224), dtype=np.float32)
    for _ in range(args.repeat):
        costs.clear()
        start = time.perf_counter()
        result = onnxprune.prune(args.model, images, onnxprune.PruneOptions(flops=0.5, latency=False, device=device))
        stages = {k: round(v, 2) for k, v in result.report.seconds.items()}
        print(f"{args.device}: conversion {time.perf_counter() - start:.1f} s {stages}, "
              f"fidelity {result.report.fidelity_relative_error:.4f}")
        total = [0, 0.0, 0.0, 0, 0.0]
        for maker, entry in sorted(costs.items(), key=lambda kv: -(kv[1][1] + kv[1][2] + kv[1][4])):
            print(f"  {maker:36s} sessions {entry[0]:3d}  created in {entry[1]:6.2f} s  first runs {entry[2]:6.2f} s  "
                  f"other runs {entry[3]:4d} in {entry[4]:6.2f} s")
            total = [a + b for a, b in zip(total, entry)]
        print(f"  {'all':36s} sessions {total[0]:3d}  created in {total[1]:6.2f} s  first runs {total[2]:6.2f} s  "
              f"other runs {total[3]:4d} in {total[4]:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
