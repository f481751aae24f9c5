"""How much the default conversion's accuracy depends on which calibration images it gets.

The accuracy table (run_bench.py) prunes each model with one fixed set of 256
training images. This script repeats the default conversion (snpfi, auto, with
and without recovery) with several sets of 256 images drawn at random from the
same training split (seeded; never the test split) and prints, per model and
target, the accuracy loss on the full test split for each draw next to the
shipped set's, with the spread. Numbers near a threshold in the accuracy table
should be read against this spread.

    python bench/calib_draws.py --draws 3 --ratios 0.3,0.5

Needs the MNIST / Fashion-MNIST files (models/datasets.py fetches them) and the
benchmark models (bench/make_bench_models.py). Writes
bench/results/DATE-calib-draws.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "models"))
sys.path.insert(0, HERE)

import onnxprune  # noqa: E402
from run_bench import MODELS, accuracy, preprocessed  # noqa: E402

DATASET = {"mnist_cnn": "mnist", "alexnet_mnist": "mnist", "fmnist_resnet": "fashion_mnist",
           "mobilenetv1_fmnist": "fashion_mnist", "resnet20_fmnist": "fashion_mnist"}
IMAGES = 256


def draws(dataset: str, count: int, images: int = IMAGES):
    """``count`` sets of ``images`` training images, preprocessed as every benchmark model expects."""
    import datasets

    x_train = datasets.LOADERS[dataset]()[0]
    for seed in range(count):
        idx = np.sort(np.random.default_rng(1000 + seed).choice(len(x_train), size=images, replace=False))
        yield seed, preprocessed(x_train[idx])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DATASET))
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--images", type=int, default=IMAGES, help="images per drawn set (the shipped sets have 256)")
    ap.add_argument("--name", default="calib-draws")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    start = time.time()
    for name in args.models.split(","):
        model_path, shipped, (x, y) = MODELS[name]()
        base = accuracy(model_path, x, y)
        sets = [("shipped", shipped)] + [(f"draw {s}", c) for s, c in draws(DATASET[name], args.draws, args.images)]
        for ratio in ratios:
            for label, calib in sets:
                for recover in (True, False):
                    opts = onnxprune.PruneOptions(flops=ratio, recover=recover, latency=False, max_images=max(256, args.images))
                    # with recovery the tool also evaluates the same channels merely sliced
                    r = onnxprune.prune(model_path, calib, opts, evaluate=(x, y) if recover else None)
                    acc = r.report.accuracy_after if recover else accuracy(r.model, x, y)
                    rows.append(dict(model=name, ratio=ratio, calib=label, recover=recover, base=base, accuracy=acc,
                                     accuracy_sliced=r.report.accuracy_without_refit,  # None: refit rejected
                                     flops_reduction=r.report.flops_reduction,
                                     fidelity_error=r.report.fidelity_relative_error))
                    print(f"{name} {ratio} {label:8} {'rec' if recover else '   '} {acc:.4f} "
                          f"({(acc - base) * 100:+.2f}p, -{r.report.flops_reduction:.1%})", flush=True)
    minutes = (time.time() - start) / 60
    date = datetime.date.today().isoformat()
    out = os.path.join(HERE, "results", f"{date}-{args.name}")
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(table(rows, args, date, minutes))
    print(f"written to {out}.md")


def table(rows, args, date, minutes) -> str:
    import onnxruntime

    lines = [f"# Accuracy against the calibration images drawn, {date}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; onnxruntime "
             f"{onnxruntime.__version__} (CPU provider); took {minutes:.1f} min. Command: "
             f"`python bench/calib_draws.py --models {args.models} --ratios {args.ratios} --draws {args.draws}"
             f"{' --images ' + str(args.images) if args.images != IMAGES else ''}{' --name ' + args.name if args.name != 'calib-draws' else ''}`", "",
             f"Default conversion (snpfi, auto, default rounding) with the shipped calibration set (the one of the "
             f"accuracy table) and with {args.draws} sets of {args.images} images drawn from the same training split "
             f"(seeds 1000..{1000 + args.draws - 1}). Cells: accuracy loss on the full test split in points "
             f"(positive: worse). \"sliced\": the channels of the recovery run merely sliced, as the tool measures "
             f"them beside the refit. Recovered share: 1 - loss with recovery / loss of those same channels "
             f"sliced, per draw; against --no-recover: 1 - loss with recovery / loss of the --no-recover "
             f"conversion, whose channels are chosen for slicing.", "",
             "| model | R | recovery | shipped | " + " | ".join(f"draw {s}" for s in range(args.draws))
             + " | mean over all | range |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in range(args.draws)) + " | --- | --- |"]
    keys = []
    for r in rows:
        k = (r["model"], r["ratio"])
        if k not in keys:
            keys.append(k)
    for model, ratio in keys:
        for recover in (True, False):
            cells = [r for r in rows if (r["model"], r["ratio"], r["recover"]) == (model, ratio, recover)]
            loss = [(r["base"] - r["accuracy"]) * 100 for r in cells]
            lines.append(f"| {model} | {ratio} | {'on' if recover else 'off'} | "
                         + " | ".join(f"{v:.2f}" for v in loss)
                         + f" | {np.mean(loss):.2f} | {min(loss):.2f} .. {max(loss):.2f} |")
        on = [r for r in rows if (r["model"], r["ratio"], r["recover"]) == (model, ratio, True)]
        off = [r for r in rows if (r["model"], r["ratio"], r["recover"]) == (model, ratio, False)]
        sliced_acc = [np.nan if r["accuracy_sliced"] is None else r["accuracy_sliced"] for r in on]  # nan: refit rejected
        sliced = [(r["base"] - a) * 100 for r, a in zip(on, sliced_acc)]
        lines.append(f"| {model} | {ratio} | sliced | " + " | ".join(f"{v:.2f}" for v in sliced)
                     + f" | {np.nanmean(sliced):.2f} | {np.nanmin(sliced):.2f} .. {np.nanmax(sliced):.2f} |")
        for label, without in (("recovered share", sliced_acc),
                               ("against --no-recover", [r["accuracy"] for r in off])):
            share = [1 - (a["base"] - a["accuracy"]) / (a["base"] - w) if a["base"] > w else float("nan")
                     for a, w in zip(on, without)]
            lines.append(f"| {model} | {ratio} | {label} | " + " | ".join(f"{v:.0%}" for v in share)
                         + f" | {np.nanmean(share):.0%} | {np.nanmin(share):.0%} .. {np.nanmax(share):.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
