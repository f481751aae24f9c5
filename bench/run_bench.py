"""Accuracy of every method x criterion x allocation x recovery at several FLOPs targets, on real data.

    python bench/run_bench.py [--models mnist_cnn,fmnist_resnet,...] [--ratios 0.3,0.5,0.6,0.7]
                              [--full] [--only snpfi/auto,bottleneck] [--name accuracy] [--out bench/results]

Calibration images come from the training split (the shipped PNG folders, or the
benchmark cache's NAME_calib.npy); accuracy is top-1 on the full 10k test split,
through onnxruntime. With recovery on, the tool also evaluates the same channels merely
sliced (--eval's "without the refit"), and a second table per model gives the share of that
loss recovery removes. Every configuration of a model runs in the same process, one
after another, so the time ratios in a row are comparable; absolute seconds depend
on the machine and its load. The table and a JSON file with every number go to
--out, named by date and machine.
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
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "models"))

import onnxprune  # noqa: E402
from onnxprune.runtime import kernel_channel_block  # noqa: E402
from onnxprune.verify import accuracy as verify_accuracy  # noqa: E402

BENCH_CACHE = os.path.expanduser(os.environ.get("ONNXPRUNE_BENCH", "~/.cache/onnxprune-bench"))

CRITERIA = ("snpfi", "l1", "l2", "random", "activation", "bn-scale")
WITH_RECOVERY = (("snpfi", "auto"), ("snpfi", "uniform"), ("l1", "uniform"), ("l1", "auto"))


def preprocessed(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) digits as every benchmark model takes them: float32 (N, 1, 28, 28), pixel / 255."""
    return images[:, None].astype(np.float32) * np.float32(1 / 255)


def _shipped(name: str, dataset: str):
    import datasets  # models/datasets.py: fetches MNIST / Fashion-MNIST offline

    _, _, x, y = datasets.load_mnist() if dataset == "mnist" else datasets.load_fashion_mnist()
    test = (preprocessed(x), y)
    return os.path.join(ROOT, "models", f"{name}.onnx"), os.path.join(ROOT, "models", f"{name}_calib"), test


def _cached(name: str):
    path = os.path.join(BENCH_CACHE, name)
    data = np.load(path + "_test.npz")
    return path + ".onnx", np.load(path + "_calib.npy"), (data["x"], data["y"])


MODELS = {
    "mnist_cnn": lambda: _shipped("mnist_cnn", "mnist"),
    "fmnist_resnet": lambda: _shipped("fmnist_resnet", "fmnist"),
    "alexnet_mnist": lambda: _cached("alexnet_mnist"),
    "mobilenetv1_fmnist": lambda: _cached("mobilenetv1_fmnist"),
    "resnet20_fmnist": lambda: _cached("resnet20_fmnist"),
    # wide 3x3 layers for bench/patch_limit.py; not in the accuracy table's default set
    "vggwide_fmnist": lambda: _cached("vggwide_fmnist"),
}


TABLE_MODELS = ("mnist_cnn", "fmnist_resnet", "alexnet_mnist", "mobilenetv1_fmnist", "resnet20_fmnist")


def accuracy(model, x, y) -> float:
    """Top-1 on (x, y) of a model or a model file, on the CPU provider."""
    import onnx

    return verify_accuracy(onnx.load(model) if isinstance(model, str) else model, x, y, ["CPUExecutionProvider"])


def cpu_name() -> str:
    """The CPU's model name, as Linux gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_rev() -> str:
    """The commit benchmarked, and whether onnxprune/ differs from it."""
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "onnxprune"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"commit {rev}" + (" (onnxprune/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def machine_text(device: str = "cpu") -> str:
    """The machine a benchmark ran on, in words: the CPU's model and cores, and the GPU where
    ``device`` is cuda (timings from machines of different kinds are not to be compared)."""
    text = f"{cpu_name()}, {os.cpu_count()} cores"
    if device == "cuda":
        import subprocess
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = ""
        text += f", GPU {gpu or 'unnamed (nvidia-smi did not answer)'}"
    return text


def plain_pass_seconds(model_path: str, calib, repeats: int = 3, batch_size: int = 32,
                       providers=("CPUExecutionProvider",)) -> float:
    """One onnxruntime pass over the same calibration images the conversion uses, in batches of
    ``batch_size``, in a warm session: the fastest of ``repeats`` passes after one warm-up batch. (A session's
    first pass was 4-25% slower on the 28x28 models, which flattered every ratio against it.)"""
    from onnxprune.data import input_spec, load_calibration
    import onnx

    opts = onnxprune.PruneOptions(flops=0.5, batch_size=batch_size)
    spec = input_spec(onnx.load(model_path, load_external_data=False), opts)
    cal = load_calibration(calib, spec, opts)
    everything = np.arange(len(cal))
    sess = ort.InferenceSession(model_path, providers=list(providers))
    sess.run(None, {cal.spec.name: next(cal.batches(everything))})
    best = float("inf")
    for _ in range(repeats):
        # a fresh set: one that served a pass keeps its decoded images, and a plain pass decodes
        cal = load_calibration(calib, spec, opts)
        start = time.perf_counter()
        for batch in cal.batches(everything):  # decoding images is part of a pass
            sess.run(None, {cal.spec.name: batch})
        best = min(best, time.perf_counter() - start)
    return best


def configurations(full: bool, only=None):
    """(method, criterion, allocation, recover); ``only``: names such as "snpfi/auto" or "bottleneck"."""
    every = []
    for criterion in CRITERIA:
        for allocation in ("auto", "uniform"):
            every.append(("snpfi", criterion, allocation, False))
    every.append(("bottleneck", "gates", "threshold", False))
    for criterion, allocation in WITH_RECOVERY if not full else [(c, a) for c in CRITERIA for a in ("auto", "uniform")]:
        every.append(("snpfi", criterion, allocation, True))
    every.append(("bottleneck", "gates", "threshold", True))
    for allocation in ("auto", "uniform"):
        every.append(("snpfi", "snpfi-output", allocation, False))
    every.append(("snpfi", "snpfi-output", "auto", True))
    for method, criterion, allocation, recover in every:
        name = "bottleneck" if method == "bottleneck" else f"{criterion}/{allocation}"
        if (only is None and criterion != "snpfi-output") or (only is not None and name in only):
            yield method, criterion, allocation, recover


def run_model(name: str, ratios, full: bool, log, only=None, round_to=None):
    model_path, calib, (x, y) = MODELS[name]()
    base = accuracy(model_path, x, y)
    plain = plain_pass_seconds(model_path, calib)
    log(f"{name}: accuracy {base:.4f}, plain pass {plain:.2f}s")
    rows = []
    for ratio in ratios:
        for method, criterion, allocation, recover in configurations(full, only):
            opts = onnxprune.PruneOptions(flops=ratio, method=method, recover=recover, round_to=round_to, **(
                dict(criterion=criterion, allocation=allocation) if method == "snpfi" else {}))
            if criterion == "snpfi-output":  # snpfi with the sampled output payoff (default --budget)
                opts = opts.replace(criterion="snpfi", payoff="output")
            start = time.perf_counter()
            try:
                # with recovery the tool evaluates the same channels without the refit beside it
                result = onnxprune.prune(model_path, calib, opts, evaluate=(x, y) if recover else None)
            except onnxprune.PruneError as e:
                log(f"  {ratio} {criterion}/{allocation}/{'rec' if recover else 'plain'}: {e}")
                continue
            r = result.report
            # the conversion proper; the latency measurement and the evaluation are timed on their own
            wall = time.perf_counter() - start - r.seconds.get("latency", 0.0) - r.seconds.get("evaluate", 0.0)
            acc = r.accuracy_after if r.accuracy_after is not None else accuracy(result.model, x, y)
            rows.append(dict(model=name, ratio=ratio, method=method, criterion=criterion, allocation=allocation, recover=recover,
                             flops_reduction=r.flops_reduction, accuracy=acc, base_accuracy=base,
                             fidelity_error=r.fidelity_relative_error, fidelity_top1=r.fidelity_top1_agreement,
                             wall_seconds=wall, plain_pass_seconds=plain, seconds=r.seconds,
                             round_to=r.round_to, block=round_to or BLOCK, latency=r.latency,
                             refit_rejected=r.refit_rejected,
                             # the same channels merely sliced; None where the refit was rejected
                             accuracy_sliced=r.accuracy_without_refit))
            log(f"  {ratio} {criterion:10} {allocation:7} {'rec' if recover else '   '} "
                f"-{r.flops_reduction:.1%} acc {acc:.4f} ({(acc - base) * 100:+.2f}p) "
                f"wall {wall:.1f}s = {wall / plain:.1f}x plain")
    return base, plain, rows


BLOCK = kernel_channel_block(["CPUExecutionProvider"])[0]  # the default --round-to on this machine


def _cell(row) -> str:
    """Accuracy (FLOPs removed, batch-32 speedup measured by the report, and the rounding used
    where the default fell back from the kernels' block)."""
    extra = [f"-{row['flops_reduction']:.1%}"]
    big = [lat for lat in row.get("latency", []) if lat["batch"] > 1]
    if big:
        extra.append(f"{big[0]['before_ms'] / big[0]['after_ms']:.2f}x")
    if row.get("round_to") and row["round_to"] != row.get("block"):
        extra.append(f"r{row['round_to']}")
    if row.get("refit_rejected"):
        extra.append("refit rejected")
    return f"{row['accuracy']:.2%} ({', '.join(extra)})"


def _shared_cell(row, base) -> str:
    """Points lost sliced -> with recovery, and the share of the sliced loss recovery removes."""
    sliced, rec = (base - row["accuracy_sliced"]) * 100, (base - row["accuracy"]) * 100
    share = f"{1 - rec / sliced:.0%}" if sliced > 0 else "n/a"
    return f"{sliced:.2f} -> {rec:.2f} ({share})"


def _config_cells(rows, c, a, rec, ratios, cell):
    """One configuration's cells, ``cell(row)`` per ratio, after its method, criterion and allocation."""
    cells = []
    for q in ratios:
        hit = [r for r in rows if (r["criterion"], r["allocation"], r["recover"], r["ratio"]) == (c, a, rec, q)]
        cells.append(cell(hit[0]) if hit else "n/a")
    return f"{'bottleneck' if c == 'gates' else 'snpfi'} | {c} | {a} | ", " | ".join(cells)


def table(results) -> str:
    lines = []
    for name, (base, plain, rows) in results.items():
        lines.append(f"### {name} (accuracy {base:.2%}; plain onnxruntime pass over the calibration images in a warm session, fastest of 3: {plain:.3f} s)")
        lines.append("")
        ratios = sorted({r["ratio"] for r in rows})
        lines.append("| method | criterion | allocation | recovery | " + " | ".join(f"R={q}" for q in ratios) + " |")
        lines.append("| --- | --- | --- | --- | " + " | ".join("---" for _ in ratios) + " |")
        keys = list(dict.fromkeys((r["criterion"], r["allocation"], r["recover"]) for r in rows))
        for c, a, rec in keys:
            config, cells = _config_cells(rows, c, a, rec, ratios, _cell)
            lines.append(f"| {config}{'on' if rec else 'off'} | {cells} |")
        lines.append("")
        shared = [r for r in rows if r["recover"] and r.get("accuracy_sliced") is not None]
        if shared:
            lines.append("Recovery against the same channels merely sliced (the model the tool measures beside the refit): "
                         "points lost on the test split, and the share of the sliced model's loss that recovery removes:")
            lines.append("")
            lines.append("| method | criterion | allocation | " + " | ".join(f"R={q}" for q in ratios) + " |")
            lines.append("| --- | --- | --- | " + " | ".join("---" for _ in ratios) + " |")
            for c, a, rec in keys:
                if rec:
                    config, cells = _config_cells(shared, c, a, rec, ratios, lambda r: _shared_cell(r, base))
                    lines.append(f"| {config}{cells} |")
            lines.append("")
        timed = [r for r in rows if r["criterion"] == "snpfi" and r["allocation"] == "auto"]
        if timed:
            lines.append("Time of the default conversion (snpfi, auto), in plain passes over the calibration images:")
            lines.append("")
            lines.append("| R | recovery | calibrate + score | refit | verify | whole conversion | latency measurement |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- |")
            for r in timed:
                s = r["seconds"]
                score = s.get("calibrate", 0) + s.get("score_allocate", 0)
                lines.append(f"| {r['ratio']} | {'on' if r['recover'] else 'off'} | {score / plain:.2f}x | "
                             f"{s.get('refit', 0) / plain:.2f}x | {s.get('verify', 0) / plain:.2f}x | "
                             f"{r['wall_seconds'] / plain:.2f}x | {s.get('latency', 0):.2f} s |")
            lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(TABLE_MODELS))
    p.add_argument("--ratios", default="0.3,0.5,0.6,0.7")
    p.add_argument("--full", action="store_true", help="recovery rows for every criterion, not only snpfi and l1")
    p.add_argument("--only", default=None, help="comma-separated configurations, e.g. snpfi/auto,l1/uniform,bottleneck")
    p.add_argument("--round-to", type=int, default=None, help="pass this --round-to (default: the tool's default)")
    p.add_argument("--name", default="accuracy", help="results file stem after the date")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    results = {}
    for name in args.models.split(","):
        only = set(args.only.split(",")) if args.only else None
        results[name] = run_model(name, ratios, args.full, lambda line: print(line, flush=True), only, args.round_to)
    stamp = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, default --round-to {BLOCK}"
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{stamp}-{args.name}")
    header = (f"# onnxprune accuracy benchmark, {stamp}\n\nMachine: {machine}; onnxruntime "
              f"{ort.__version__} (CPU provider). Command: `python bench/run_bench.py --models {args.models} "
              f"--ratios {args.ratios}{' --full' if args.full else ''}{' --only ' + args.only if args.only else ''}"
              f"{' --round-to ' + str(args.round_to) if args.round_to else ''}"
              f"{' --name ' + args.name if args.name != 'accuracy' else ''}`\n\nCells: top-1 accuracy on the full test "
              "split (achieved FLOPs reduction, batch-32 CPU speedup from the report's latency measurement, and rN where "
              "the default rounding fell back to multiples of N to meet the target within a point; \"refit rejected\" "
              "where the refit did worse on the held-out images than slicing and was not written). Calibration: 256 "
              "training-split images (51 held out); bench/results/*-calib-draws.md shows how much other draws move "
              "the default's numbers.\n\n")
    with open(base + ".md", "w") as f:
        f.write(header + table(results))
    with open(base + ".json", "w") as f:
        json.dump({"date": stamp, "machine": machine, "results": {k: v[2] for k, v in results.items()}}, f, indent=1)
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
