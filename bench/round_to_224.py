"""Latency of ImageNet-sized networks pruned at several --round-to, to choose a provider's default.

    python bench/round_to_224.py [--models resnet18,mobilenet_v2] [--round-to 8,16,32,64]
                                 [--ratio 0.5] [--batches 1,32,128] [--device cpu|cuda]

The networks are bench/scale_cost.py's (torchvision, random weights, exported with its
--export): latency, not accuracy, is the point. Each is pruned by --ratio of its FLOPs at
each rounding with the local payoff and no recovery (the channel counts are what is timed),
from 64 random images, then timed as the report times it (median over fresh interleaved
sessions) at each of --batches. Prints the machine, the commit and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import onnxprune  # noqa: E402
from onnxprune import latency  # noqa: E402
from onnxprune.runtime import choose_providers  # noqa: E402
from run_bench import git_rev, machine_text  # noqa: E402
from scale_cost import model_path  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--round-to", default="8,16,32,64")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args()
    providers, provider_text = choose_providers(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    cal = np.random.default_rng(0).random((64, 3, 224, 224), dtype=np.float32)
    print(f"Machine: {machine_text(args.device)}; onnxruntime {ort.__version__}, {provider_text}; {git_rev()}\n")
    print("| model | round-to | FLOPs removed | " + " | ".join(f"batch {b} ms before -> after | speedup" for b in batches)
          + " | conversion |")
    print("| --- | --- | --- | " + " | ".join("--- | ---" for _ in batches) + " | --- |")
    for name in args.models.split(","):
        path = model_path(name)
        original = onnx.load(path)
        for rt in [int(v) for v in args.round_to.split(",")]:
            start = time.perf_counter()
            r = onnxprune.prune(path, cal, onnxprune.PruneOptions(flops=args.ratio, round_to=rt, recover=False,
                                                                  latency=False, device=args.device))
            seconds = time.perf_counter() - start
            timed = latency.measure(original, r.model, original.graph.input[0].name, cal[0], batches, providers)
            print(f"| {name} | {rt} | -{r.report.flops_reduction:.1%} | " + " | ".join(
                f"{t.before_ms:.2f} -> {t.after_ms:.2f} | {t.speedup:.2f}x" for t in timed) + f" | {seconds:.0f} s |",
                flush=True)


if __name__ == "__main__":
    main()
