"""What a sweep saves by calibrating and scoring once: its wall time against separate
conversions at the same targets, measured in one run.

    python bench/sweep_cost.py [--targets 0.3,0.5,0.7] [--images 256] [--repeats 2]

Models: the scale-cost benchmark's ResNet-18 and MobileNetV2 at 224x224 (export them first:
``python bench/scale_cost.py --export``), from a folder of ``--images`` synthetic 500x375
JPEGs (scale_cost.write_jpegs), and the shipped fmnist_resnet from its calibration folder.
For each model, alternately (fastest of ``--repeats`` each): ``onnxprune.prune`` once per
target (what --sweep did before it shared the target-independent stages) and
``onnxprune.prune_each`` over the targets (what --sweep does now); latency is not measured
(it is per target either way). The models each way are compared weight for weight.
Writes bench/results/DATE-sweep-cost.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnxprune  # noqa: E402
from scale_cost import model_path, write_jpegs  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(HERE), "models")


def _weights(path: str):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _same(a: str, b: str) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def _separate(model, calib, targets, opts, folder) -> float:
    start = time.perf_counter()
    for t in targets:
        onnxprune.prune(model, calib, opts.replace(flops=t)).save(os.path.join(folder, f"alone-{t:g}.onnx"))
    return time.perf_counter() - start


def _swept(model, calib, targets, opts, folder) -> float:
    start = time.perf_counter()

    def save(target, result):
        if isinstance(result, onnxprune.TargetError):
            raise result
        result.save(os.path.join(folder, f"swept-{target:g}.onnx"))

    onnxprune.prune_each(model, calib, targets, save, opts)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="0.3,0.5,0.7")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    opts = onnxprune.PruneOptions(flops=targets[0], latency=False)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = os.path.join(tmp, "jpegs")
        os.makedirs(jpegs)
        write_jpegs(jpegs, args.images)
        cases = [(name, model_path(name), jpegs, f"{args.images} JPEGs, 224x224")
                 for name in ("resnet18", "mobilenet_v2")]
        cases.append(("fmnist_resnet", os.path.join(SHIPPED, "fmnist_resnet.onnx"),
                      os.path.join(SHIPPED, "fmnist_resnet_calib"), "shipped folder, 28x28"))
        for name, model, calib, given in cases:
            if not os.path.exists(model):
                sys.exit(f"{model} is missing: run python bench/scale_cost.py --export first")
            alone, swept = [], []
            for _ in range(args.repeats):  # alternated, so that drift on a shared machine hits both
                alone.append(_separate(model, calib, targets, opts, tmp))
                swept.append(_swept(model, calib, targets, opts, tmp))
            same = all(_same(os.path.join(tmp, f"alone-{t:g}.onnx"), os.path.join(tmp, f"swept-{t:g}.onnx"))
                       for t in targets)
            row = (f"| {name} | {given} | {min(alone):.2f} s | {min(swept):.2f} s | {min(alone) / min(swept):.2f}x | "
                   f"{'identical' if same else 'DIFFERENT'} |")
            print(row, flush=True)
            rows.append(row)
    date = datetime.date.today().isoformat()
    out = os.path.join(HERE, "results", f"{date}-sweep-cost.md")
    with open(out, "w") as f:
        f.write(f"# Sweep against separate conversions, {date}\n\n"
                f"Machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__}, CPU provider; "
                f"took {(time.perf_counter() - started) / 60:.1f} min. Command: `python bench/sweep_cost.py "
                f"--targets {args.targets} --images {args.images} --repeats {args.repeats}`\n\n"
                f"Targets {args.targets} (FLOPs), default options, latency not measured; fastest of {args.repeats} "
                "each way, alternated. Separate: `prune()` per target, as --sweep ran before. Sweep: `prune_each()`, "
                "which loads, analyses, calibrates and scores once.\n\n"
                "| model | calibration | separate conversions | sweep | speedup | models |\n"
                "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
