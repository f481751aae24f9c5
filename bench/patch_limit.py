"""Exact patch refit against channel-level refit, by layer width: which wins where.

Recovery fits a dense Conv exactly over im2col patches (kept inputs x kernel taps
unknowns per output, rows sampled) when that row is at most ``recover.PATCH_LIMIT``
wide, and otherwise by regressing the original input's channels on the pruned
input's, pixel by pixel (C unknowns, every pixel a row). This script runs the
default conversion with several limits, in one process, and prints for each: how
many layers got each fit, the refit's and the whole conversion's seconds, the
held-out fidelity (relative output error on the images kept away from fitting)
and, for the benchmark models with a test split, the top-1 accuracy lost.

    python bench/patch_limit.py [--models mnist_cnn,...,resnet18,mobilenet_v2]
                                [--limits 0,300,600,1200,2304,4608,4608:64] [--ratios 0.3,0.5,0.7]
                                [--name patch-limit]

A limit written LIMIT:ROWS also sets the sampled rows per unknown (refit.ROWS_PER_UNKNOWN,
16 by default): 4608:64 is the "thorough" setting of bench/results/2026-11-22-thorough.md.

resnet18 and mobilenet_v2 are the 224x224 torchvision networks of scale_cost.py
(random weights, 256 random inputs): costs and fidelity only. Writes
bench/results/DATE-NAME.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np
import onnxruntime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_bench  # noqa: E402
import scale_cost  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune import api, recover  # noqa: E402


def _load(name: str):
    """(model path, calibration, test split or None)."""
    if name in run_bench.MODELS:
        return run_bench.MODELS[name]()
    path = scale_cost.model_path(name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: run `python bench/scale_cost.py --export` (needs torchvision)")
    return path, np.random.default_rng(0).random((256, 3, 224, 224), dtype=np.float32), None


def _fits_made(run):
    """Run ``run()`` and return its result with the refit's log (patch and channel fits)."""
    logs = []
    original = api.refit_sequential  # the name the conversion calls

    def logged(*args, **kwargs):
        log = original(*args, **kwargs)
        logs.append(log)
        return log

    api.refit_sequential = logged
    try:
        result = run()
    finally:
        api.refit_sequential = original
    patch = sum(len(log.patch) for log in logs)
    channel = sum(len(log.channel) for log in logs)
    return result, patch, channel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mnist_cnn,fmnist_resnet,alexnet_mnist,mobilenetv1_fmnist,resnet20_fmnist,vggwide_fmnist")
    ap.add_argument("--limits", default="0,300,600,1200,2304,4608")
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="patch-limit", help="the results file is DATE-NAME.md")
    args = ap.parse_args()
    limits = args.limits.split(",")
    ratios = [float(v) for v in args.ratios.split(",")]
    default = (recover.PATCH_LIMIT, recover.ROWS_PER_UNKNOWN)
    started = time.time()
    rows = []
    for name in args.models.split(","):
        path, calib, test = _load(name)
        base = run_bench.accuracy(path, *test) if test is not None else None
        for ratio in ratios:
            opts = onnxprune.PruneOptions(flops=ratio, latency=False)
            for limit in limits:
                width, _, per_unknown = limit.partition(":")
                recover.PATCH_LIMIT, recover.ROWS_PER_UNKNOWN = int(width), int(per_unknown or default[1])
                setting = (recover.PATCH_LIMIT, recover.ROWS_PER_UNKNOWN)
                try:
                    t = time.perf_counter()
                    result, patch, channel = _fits_made(lambda: onnxprune.prune(path, calib, opts))
                    whole = time.perf_counter() - t
                finally:
                    recover.PATCH_LIMIT, recover.ROWS_PER_UNKNOWN = default
                rep = result.report
                loss = f"{100 * (base - run_bench.accuracy(result.model, *test)):.2f}" if test is not None else "-"
                row = (f"| {name} | {ratio:g} | {limit}{' (default)' if setting == default else ''} | {patch} / {channel} | "
                       f"{rep.seconds['refit']:.2f} | {whole:.2f} | {rep.fidelity_relative_error:.4f} | {loss} |")
                rows.append(row)
                print(row, flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    head = (f"# Patch refit against channel-level refit, by layer width, {datetime.date.today()}\n\n"
            f"Machine: {machine}; onnxruntime {onnxruntime.__version__} (CPU provider); took "
            f"{(time.time() - started) / 60:.1f} min. Command: `python bench/patch_limit.py --models {args.models} "
            f"--limits {args.limits} --ratios {args.ratios} --name {args.name}`\n\n"
            "Default conversion (snpfi, auto, recovery on, latency off) with convs whose kept im2col row "
            "(kept inputs x taps) is at most the limit fitted exactly over sampled patches, wider ones "
            "channel by channel; LIMIT:ROWS also sets the sampled rows per unknown (16 by default). Fidelity: relative output error on the held-out calibration images. "
            "Loss: top-1 points lost on the full test split (- for the random-weight 224x224 networks).\n\n"
            "| model | R | patch limit | layers fitted by patch / by channel | refit s | conversion s | "
            "held-out error | accuracy loss |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"{datetime.date.today()}-{args.name}.md")
    with open(out, "w") as f:
        f.write(head + "\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
