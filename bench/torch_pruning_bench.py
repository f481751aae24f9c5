"""onnxprune side by side with Torch-Pruning, both without fine-tuning (issue 8).

    /tmp/torchenv/bin/python bench/torch_pruning_bench.py [--models alexnet_mnist,...]
        [--ratios 0.3,0.5,0.7] [--onnxprune-python /tmp/venv/bin/python] [--out bench/results]

Run it from the repository root with a venv that has torch, torch-pruning and
onnxprune's own dependencies (onnx, onnxruntime, onnx-graphsurgeon, numpy, scipy,
click, pillow, threadpoolctl): this script imports onnxprune from this checkout
only for counting (onnxprune.flops) and timing (onnxprune.latency), so that both
sides are counted and timed by the same code. The conversions themselves run the
onnxprune CLI in child processes with --onnxprune-python (the product's own venv),
PYTHONPATH set to this checkout.

For each model and each target R:

* onnxprune: `python -m onnxprune IN OUT --calib CALIB --flops R --eval TEST --report r.json`,
  with its defaults (snpfi, auto allocation, recovery, default rounding) and once more
  with --no-recover.
* Torch-Pruning (tp.pruner.BasePruner, one step, no fine-tuning, the classifier's
  output layer in ignored_layers, every other argument at its default) with
  MagnitudeImportance(p=1) (group L1, TP's default mean reduction and
  normalizer) and, where the model has BatchNorm, BNScaleImportance; each with
  global_pruning False (the same ratio in every layer) and True (one ranking).
  TP's pruning_ratio is found by bisection so that the FLOPs reduction of the
  exported model is the closest it can get to what onnxprune (with recovery)
  achieved at R.
* Every model, the original included, is an ONNX file (TP's: torch.onnx.export,
  TorchScript exporter, opset 13, dynamic batch, the original's export settings);
  MACs and parameters are counted on the ONNX files by onnxprune.flops, accuracy
  is top-1 on the full 10k test split with onnxruntime (CPU), latency is
  onnxruntime CPU at batch 1 and 32: per model the median over fresh sessions
  created in turn over all models of the same (model, R) table (interleaved, so
  load drift hits all alike), thread spinning off, each session timed by
  onnxprune.latency's own routine.
* Cost of the conversion: wall time and peak RSS of the onnxprune CLI child
  (without --eval, --report and the latency measurement) next to a child that
  only makes one plain onnxruntime pass over the same calibration images, with the
  same interpreter and the same imports (onnxprune's loader decodes the images),
  so the ratio is the conversion's own work. Peak RSS comes from /usr/bin/time.

The models: the three of bench/make_bench_models.py (state dicts in the bench
cache), mnist_cnn (its ONNX keeps BatchNormalization, so the torch module is
rebuilt exactly from the ONNX initializers) and fmnist_resnet (its ONNX has
BatchNorm folded into the convs; the torch module is retrained with
models/make_models.py's seeds and recipe, and used only if its export matches the
shipped ONNX). Work files go to $ONNXPRUNE_BENCH/torch_pruning (outside the
repository); the tables and a JSON file with every number go to --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch_pruning as tp
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "models"))

import bench_models  # noqa: E402
import datasets  # noqa: E402
import make_models  # noqa: E402
from onnxprune.flops import count_macs, count_params  # noqa: E402
from onnxprune.latency import time_session  # noqa: E402  (the product's per-session timing)
from onnxprune.runtime import make_session  # noqa: E402  (spinning off, as in the product)

BENCH_CACHE = os.path.expanduser(os.environ.get("ONNXPRUNE_BENCH", "~/.cache/onnxprune-bench"))
WORK = os.path.join(BENCH_CACHE, "torch_pruning")
INPUT_SHAPE = (1, 1, 28, 28)
PROVIDERS = ["CPUExecutionProvider"]
LATENCY_BATCHES = (1, 32)
LATENCY_SESSIONS = 9  # batch-1 runs take 0.1 ms: one busy moment of the shared machine spoils a session
SHIPPED_TOL = 1e-4  # largest logit difference accepted between a torch module and its ONNX

warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Models: the original ONNX, the same network as a torch module, data
# --------------------------------------------------------------------------


class Case:
    """One model: original ONNX path, torch module with the same weights, calibration and test data."""

    def __init__(self, name, onnx_path, torch_model, calib, test_npz, keep_bn, classifier, note=""):
        self.name, self.onnx_path, self.torch_model = name, onnx_path, torch_model
        self.calib, self.test_npz, self.keep_bn, self.classifier, self.note = calib, test_npz, keep_bn, classifier, note
        data = np.load(test_npz)
        self.x, self.y = data["x"], data["y"]
        self.has_bn = any(isinstance(m, nn.BatchNorm2d) for m in torch_model.modules())


def _full_test_npz(dataset: str) -> str:
    """The full 10k test split as an .npz (x = pixel/255, y int64) for --eval, in the work folder."""
    path = os.path.join(WORK, f"{dataset}_test10k.npz")
    if not os.path.exists(path):
        _, _, x, y = datasets.LOADERS[dataset]()
        np.savez(path, x=make_models.preprocess(x), y=y.astype(np.int64))
    return path


def _last_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _bench_case(name: str) -> Case:
    model = bench_models.build(name)
    model.load_state_dict(torch.load(os.path.join(BENCH_CACHE, name + ".pt"), weights_only=True))
    model.eval()
    return Case(name, os.path.join(BENCH_CACHE, name + ".onnx"), model, os.path.join(BENCH_CACHE, name + "_calib.npy"),
                os.path.join(BENCH_CACHE, name + "_test.npz"), False, _last_linear(model))


def _mnist_cnn_case() -> Case:
    # The shipped ONNX keeps BatchNormalization and the exporter kept torch's parameter
    # names, so its initializers are the module's complete state dict.
    path = os.path.join(ROOT, "models", "mnist_cnn.onnx")
    model = make_models.MnistCNN()
    state = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(path).graph.initializer}
    model.load_state_dict(state, strict=False)  # BN's num_batches_tracked is not in the ONNX; unused in eval
    model.eval()
    return Case("mnist_cnn", path, model, os.path.join(ROOT, "models", "mnist_cnn_calib"), _full_test_npz("mnist"),
                True, model.fc2, "torch module rebuilt exactly from the ONNX initializers (BatchNorm kept in the ONNX)")


def _fmnist_resnet_case() -> Case:
    # BN is folded in the shipped ONNX, so the module (with its BN parameters, which
    # BNScaleImportance needs) is retrained with make_models.py's recipe and seeds,
    # once, and kept in the work folder; it is used only if it reproduces the ONNX.
    spec = make_models.MODELS["fmnist_resnet"]
    pt = os.path.join(WORK, "fmnist_resnet.pt")
    model = spec.build()
    if not os.path.exists(pt):
        log("fmnist_resnet: retraining the torch module with models/make_models.py's seeds (a few minutes)")
        torch.manual_seed(spec.seed)
        np.random.seed(spec.seed)
        x_train, y_train, _, _ = datasets.LOADERS[spec.dataset]()
        make_models.train(model, torch.from_numpy(make_models.preprocess(x_train)), torch.from_numpy(y_train), spec)
        torch.save(model.state_dict(), pt + ".part")
        os.replace(pt + ".part", pt)
    model.load_state_dict(torch.load(pt, weights_only=True))
    model.eval()
    return Case("fmnist_resnet", os.path.join(ROOT, "models", "fmnist_resnet.onnx"), model,
                os.path.join(ROOT, "models", "fmnist_resnet_calib"), _full_test_npz("fashion_mnist"), False, model.fc,
                "torch module retrained with models/make_models.py's recipe and seeds; its export matches the shipped ONNX")


CASES = {
    "alexnet_mnist": lambda: _bench_case("alexnet_mnist"),
    "mobilenetv1_fmnist": lambda: _bench_case("mobilenetv1_fmnist"),
    "resnet20_fmnist": lambda: _bench_case("resnet20_fmnist"),
    "mnist_cnn": _mnist_cnn_case,
    "fmnist_resnet": _fmnist_resnet_case,
}


def export(model: nn.Module, keep_bn: bool) -> onnx.ModelProto:
    """The export the originals had: TorchScript exporter, opset 13, dynamic batch named N."""
    model.eval()
    f = io.BytesIO()
    torch.onnx.export(
        model, (torch.zeros(2, *INPUT_SHAPE[1:]),), f, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13,
        training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
        do_constant_folding=not keep_bn, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def macs(model: onnx.ModelProto) -> int:
    return count_macs(model, {"input": INPUT_SHAPE})


def logits(model, x: np.ndarray, batch: int = 500) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=PROVIDERS)
    return np.concatenate([sess.run(None, {"input": x[s:s + batch]})[0] for s in range(0, len(x), batch)])


def accuracy(model, x, y) -> float:
    return float((logits(model, x).argmax(1) == y).mean())


def check_case(case: Case) -> None:
    """The torch module must be the network the original ONNX holds: same MACs, same logits."""
    original = onnx.load(case.onnx_path)
    exported = export(case.torch_model, case.keep_bn)
    if macs(exported) != macs(original):
        raise RuntimeError(f"{case.name}: torch export counts {macs(exported)} MACs, the ONNX {macs(original)}")
    x = case.x[:512]
    with torch.no_grad():
        t = case.torch_model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(t - logits(case.onnx_path, x)).max())
    if diff > SHIPPED_TOL:
        raise RuntimeError(f"{case.name}: torch module and {case.onnx_path} disagree (max logit diff {diff:.2e})")
    case.check_diff = diff


# --------------------------------------------------------------------------
# Torch-Pruning
# --------------------------------------------------------------------------


def tp_variants(case: Case, round_to: int):
    """(row name, importance, global_pruning, round_to): TP's four variants with its defaults, and as a
    control for the latency, the two L1 ones with channel counts rounded like onnxprune's (``round_to``)."""
    out = [("tp-l1-uniform", "l1", False, None), ("tp-l1-global", "l1", True, None)]
    if case.has_bn:
        out += [("tp-bn-uniform", "bn", False, None), ("tp-bn-global", "bn", True, None)]
    if round_to > 1:
        out += [(f"tp-l1-uniform round_to={round_to}", "l1", False, round_to),
                (f"tp-l1-global round_to={round_to}", "l1", True, round_to)]
    return out


def tp_prune(case: Case, importance: str, global_pruning: bool, ratio: float, round_to=None) -> nn.Module:
    model = copy.deepcopy(case.torch_model)
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else tp.importance.BNScaleImportance()
    ignored = [_find_same(model, case.torch_model, case.classifier)]
    pruner = tp.pruner.BasePruner(model, torch.zeros(INPUT_SHAPE), importance=imp, global_pruning=global_pruning,
                                  pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return model.eval()


def _find_same(copy_model: nn.Module, original: nn.Module, module: nn.Module) -> nn.Module:
    """The module of a deep copy that corresponds to ``module`` of the original."""
    name = next(n for n, m in original.named_modules() if m is module)
    return copy_model.get_submodule(name)


def tp_match(case: Case, importance: str, global_pruning: bool, round_to, target: float, base_macs: int):
    """TP's pruning_ratio whose exported model's FLOPs reduction is closest to ``target``.

    The reduction grows with the ratio until some layer would lose every channel:
    Torch-Pruning then leaves that layer whole (global ranking at high ratios), and
    the reduction drops. So a grid of ratios (steps of 0.05) finds the first one
    that reaches the target, and bisection between it and the grid point before
    brackets the two channel-count steps around the target; the closer one is
    kept (the one above on a tie).
    """
    def reduction(ratio):
        model = tp_prune(case, importance, global_pruning, ratio, round_to)
        exported = export(model, case.keep_bn)
        return 1.0 - macs(exported) / base_macs, model, exported

    evaluations, lo, lo_val, hi, hi_val, best = 0, 0.0, (0.0, case.torch_model, None), None, None, None
    for ratio in np.round(np.arange(0.05, 0.951, 0.05), 2):
        val = reduction(float(ratio))
        evaluations += 1
        if best is None or val[0] > best[1][0]:
            best = (float(ratio), val)
        if val[0] >= target:
            hi, hi_val = float(ratio), val
            break
        lo, lo_val = float(ratio), val
    if hi is None:
        raise RuntimeError(f"{case.name}: Torch-Pruning {importance} global={global_pruning} round_to={round_to} "
                           f"removes at most "
                           f"{best[1][0]:.1%} of the FLOPs (ratio {best[0]}), short of {target:.1%}")
    while hi - lo > 1e-4 and hi_val[0] - target > 1e-4:  # stop on the target (to 0.01 points)
        mid = (lo + hi) / 2
        val = reduction(mid)
        evaluations += 1
        if val[0] >= target:
            hi, hi_val = mid, val
        else:
            lo, lo_val = mid, val
    if lo_val[2] is not None and target - lo_val[0] < hi_val[0] - target:
        ratio, (red, model, exported) = lo, lo_val
    else:
        ratio, (red, model, exported) = hi, hi_val
    return ratio, red, model, exported, evaluations


# --------------------------------------------------------------------------
# onnxprune (CLI in child processes) and the cost of a conversion
# --------------------------------------------------------------------------


def run_child(argv, env=None):
    """Run a child process; its wall seconds, peak RSS (MiB) and stdout+stderr.

    The peak RSS comes from /usr/bin/time, not from os.wait4 here: Linux carries a
    process's high-water RSS across exec into ru_maxrss, so a child forked from this
    (torch-sized) process would report at least this process's RSS. /usr/bin/time
    is small when it forks the measured child.
    """
    stats = os.path.join(WORK, "time.txt")
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{text[-3000:]}")
    with open(stats) as f:
        _, max_kib = f.read().split()[-2:]
    return wall, int(max_kib) / 1024.0, text


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def onnxprune_cli(python: str, case: Case, ratio: float, recover: bool, out_path: str, report: bool):
    argv = [python, "-m", "onnxprune", case.onnx_path, out_path, "--calib", case.calib, "--flops", str(ratio)]
    if not recover:
        argv.append("--no-recover")
    if report:
        argv += ["--eval", case.test_npz, "--report", out_path[:-5] + ".json"]
    else:
        argv.append("--no-latency")  # the cost run: the conversion alone
    return run_child(argv, child_env())


# One plain onnxruntime pass over the calibration images the CLI uses, with the same
# interpreter, the same imports (the CLI's module) and onnxprune's image loader.
PLAIN_PASS = """
import sys, time
import numpy as np, onnx
import onnxprune.cli  # the CLI's imports, so that only the work differs
from onnxprune.data import input_spec, load_calibration
from onnxprune.runtime import make_session
model_path, calib = sys.argv[1], sys.argv[2]
opts = onnxprune.PruneOptions(flops=0.5)
start = time.perf_counter()
model = onnx.load(model_path)
cal = load_calibration(calib, input_spec(model, opts), opts)
sess = make_session(model, ["CPUExecutionProvider"])
for batch in cal.batches(np.arange(len(cal))):  # batch size 32, as the CLI's default
    sess.run(None, {cal.spec.name: batch})
print(f"pass {time.perf_counter() - start:.4f}")
"""


def plain_pass(python: str, case: Case):
    return run_child([python, "-c", PLAIN_PASS, case.onnx_path, case.calib], child_env())


def conversion_cost(python: str, case: Case, ratios, reps: int):
    """Wall seconds and peak RSS of the plain pass and the two conversions, median over ``reps`` interleaved runs."""
    rows = []
    for ratio in ratios:
        runs = {"plain onnxruntime pass": [], "onnxprune (recovery)": [], "onnxprune --no-recover": []}
        for _ in range(reps):
            runs["plain onnxruntime pass"].append(plain_pass(python, case)[:2])
            out = os.path.join(WORK, f"{case.name}_cost.onnx")
            runs["onnxprune (recovery)"].append(onnxprune_cli(python, case, ratio, True, out, False)[:2])
            runs["onnxprune --no-recover"].append(onnxprune_cli(python, case, ratio, False, out, False)[:2])
        for what, vals in runs.items():
            rows.append(dict(ratio=ratio, run=what, wall_seconds=float(np.median([v[0] for v in vals])),
                             peak_rss_mib=float(np.median([v[1] for v in vals])), reps=reps))
        plain = rows[-3]
        for r in rows[-3:]:
            r["wall_vs_plain"] = r["wall_seconds"] / plain["wall_seconds"]
            r["rss_vs_plain"] = r["peak_rss_mib"] / plain["peak_rss_mib"]
        log(f"  cost at R={ratio}: " + "; ".join(f"{r['run']} {r['wall_seconds']:.2f}s {r['peak_rss_mib']:.0f}MiB"
                                                 for r in rows[-3:]))
    return rows


# --------------------------------------------------------------------------
# Latency: every model of one table, fresh sessions in turn
# --------------------------------------------------------------------------


def latencies(models: dict, sample: np.ndarray):
    """{key: {batch: median ms}} over LATENCY_SESSIONS rounds; each round makes a fresh session of every model."""
    out = {k: {} for k in models}
    for batch in LATENCY_BATCHES:
        feed = {"input": np.ascontiguousarray(np.repeat(sample[None], batch, axis=0))}
        per = {k: [] for k in models}
        for _ in range(LATENCY_SESSIONS):
            for key, model in models.items():
                per[key].append(time_session(make_session(model, PROVIDERS), feed))
        for k in models:
            out[k][batch] = 1000 * float(np.median(per[k]))
    return out


# --------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------


def run_case(case: Case, ratios, python: str, reps: int, round_to: int):
    check_case(case)
    original = onnx.load(case.onnx_path)
    base_macs, base_params = macs(original), count_params(original)
    base_acc = accuracy(case.onnx_path, case.x, case.y)
    log(f"{case.name}: {base_macs} MACs, {base_params} params, accuracy {base_acc:.4f} "
        f"(torch module vs ONNX: max logit diff {case.check_diff:.1e}); BatchNorm in torch: {case.has_bn}")
    rows = []
    for ratio in ratios:
        models = {"original": original}
        group = [dict(model=case.name, method="original", ratio=ratio, flops_reduction=0.0, macs=base_macs,
                      params=base_params, accuracy=base_acc)]
        for recover in (True, False):
            method = "onnxprune" if recover else "onnxprune --no-recover"
            out = os.path.join(WORK, f"{case.name}_R{ratio}_{'rec' if recover else 'norec'}.onnx")
            wall, rss, _ = onnxprune_cli(python, case, ratio, recover, out, True)
            pruned = onnx.load(out)
            with open(out[:-5] + ".json") as f:
                rep = json.load(f)
            m = macs(pruned)
            row = dict(model=case.name, method=method, ratio=ratio, flops_reduction=1 - m / base_macs, macs=m,
                       params=count_params(pruned), accuracy=accuracy(out, case.x, case.y),
                       report_accuracy=rep["accuracy_after"], report_flops_reduction=rep["flops_reduction"],
                       fidelity_top1=rep["fidelity_top1_agreement"], cli_seconds_with_eval=wall)
            group.append(row)
            models[method] = pruned
            log(f"  R={ratio} {method:24s} -{row['flops_reduction']:.2%} acc {row['accuracy']:.4f} "
                f"(its report: -{row['report_flops_reduction']:.2%}, acc {row['report_accuracy']:.4f})")
        target = group[1]["flops_reduction"]  # what onnxprune with recovery achieved
        for key, importance, global_pruning, tp_round_to in tp_variants(case, round_to):
            start = time.perf_counter()
            tp_ratio, red, model, exported, n = tp_match(case, importance, global_pruning, tp_round_to, target,
                                                         base_macs)
            seconds = time.perf_counter() - start
            path = os.path.join(WORK, f"{case.name}_R{ratio}_{key.replace(' round_to=', '_r')}.onnx")
            onnx.checker.check_model(exported, full_check=True)
            onnx.save(exported, path)
            start = time.perf_counter()
            tp_prune(case, importance, global_pruning, tp_ratio, tp_round_to)  # timed alone: one TP pruning (trace + step)
            prune_seconds = time.perf_counter() - start
            with torch.no_grad():  # the ONNX file must compute what the pruned torch module computes
                diff = float(np.abs(model(torch.from_numpy(case.x[:256])).numpy() - logits(path, case.x[:256])).max())
            if diff > SHIPPED_TOL:
                raise RuntimeError(f"{case.name} {key}: export differs from the pruned torch module by {diff:.2e}")
            row = dict(model=case.name, method=key, ratio=ratio, flops_reduction=red, macs=macs(exported),
                       params=count_params(exported), accuracy=accuracy(path, case.x, case.y), tp_pruning_ratio=tp_ratio,
                       bisection_steps=n, bisection_seconds=seconds, tp_prune_seconds=prune_seconds,
                       export_max_logit_diff=diff,
                       conv_channels=[mm.out_channels for mm in model.modules() if isinstance(mm, nn.Conv2d)],
                       linear_features=[mm.out_features for mm in model.modules() if isinstance(mm, nn.Linear)])
            group.append(row)
            models[key] = exported
            log(f"  R={ratio} {key:24s} -{red:.2%} acc {row['accuracy']:.4f} (TP ratio {tp_ratio:.4f}, {n} steps)")
        lat = latencies(models, case.x[0])
        for row in group:
            for b in LATENCY_BATCHES:
                row[f"latency_b{b}_ms"] = lat[row["method"]][b]
                row[f"speedup_b{b}"] = lat["original"][b] / lat[row["method"]][b]
        log("  latency ms b1/b32: " + "; ".join(f"{k} {v[1]:.3f}/{v[32]:.2f}" for k, v in lat.items()))
        rows += group
    cost = conversion_cost(python, case, ratios, reps)
    return dict(model=case.name, note=case.note, base_accuracy=base_acc, base_macs=base_macs, base_params=base_params,
                has_bn=case.has_bn, rows=rows, cost=cost)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    commit = commit.strip() + (" with uncommitted changes" if dirty.strip() else "")
    return dict(uname=" ".join(platform.uname()), cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, torch_pruning=getattr(tp, "__version__", "?"),
                torch_pruning_dist=_dist_version("torch-pruning"), onnxruntime=ort.__version__, onnx=onnx.__version__,
                commit=commit)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


def _onnxprune_reduction(res, ratio) -> float:
    return next(q["flops_reduction"] for q in res["rows"] if q["method"] == "onnxprune" and q["ratio"] == ratio)


def markdown(results, info, stamp, command) -> str:
    L = [f"# onnxprune and Torch-Pruning without fine-tuning, {stamp}", ""]
    L.append(f"Machine: `{info['uname']}`; CPU {info['cpu']}, {info['cores']} cores, shared with other jobs "
             f"(load average {info['load_start']} at the start, {info['load_end']} at the end). "
             f"Python {info['python']}, torch {info['torch']}, torch-pruning {info['torch_pruning_dist']}, "
             f"onnxruntime {info['onnxruntime']} (CPU provider), onnx {info['onnx']}; onnxprune at commit "
             f"{info['commit']}. Total time {info['seconds'] / 60:.0f} min.")
    L.append("")
    L.append(f"Command: `{command}`")
    L.append("")
    L.append(
        "Rows: **onnxprune** with its defaults (snpfi, auto allocation, recovery, the default rounding: on this "
        "AVX-512 CPU channel counts in multiples of 16, of 8 in groups under 32; 256 calibration "
        "images of the training split, 20% of them held out) and with `--no-recover`. **Torch-Pruning** "
        "(`tp.pruner.BasePruner`, one step, no fine-tuning, the output layer in `ignored_layers`, every other argument "
        "at its default, so no `round_to` and `max_pruning_ratio=1.0`) with `MagnitudeImportance(p=1)` (`tp-l1`: group "
        "L1, mean over the group, mean-normalised) or, in models with BatchNorm, `BNScaleImportance` (`tp-bn`; it "
        "scores only BatchNorm weights, so groups without BatchNorm, such as hidden Linear layers, stay whole), each "
        "with `global_pruning=False` (`uniform`: the same ratio in every group) and `True` (`global`: one ranking). "
        "The two `round_to=8` rows are a control beyond Torch-Pruning's defaults: its L1 variants with channel "
        "counts rounded down to multiples of 8 (with 16, Torch-Pruning cannot reach -50% on resnet20_fmnist), to "
        "separate the speed of the channel counts from the choice of channels.")
    L.append("")
    L.append(
        "Torch-Pruning's `pruning_ratio` is searched (a grid of 0.05, then bisection) so that its FLOPs reduction is "
        "the closest it gets to what onnxprune with recovery achieved at R; channel counts are discrete, so some "
        "land a few tenths of a point off. FLOPs (MACs of Conv and Gemm per sample) and parameters (initializer "
        "elements) are counted on the ONNX files of both by `onnxprune.flops`; Torch-Pruning's models are exported "
        "like the originals (TorchScript exporter, opset 13, dynamic batch, BatchNorm folded except in mnist_cnn, "
        "whose original keeps it) and checked against the pruned torch module. Accuracy is top-1 on the full 10k "
        "test split with onnxruntime. Latency is onnxruntime's CPU provider at batch 1 and 32, thread spinning off: "
        f"per model the median over {info['latency_sessions']} fresh sessions, created in turn over all models of a table "
        "so that drift in the machine's load hits all alike, each timed by `onnxprune.latency`; speedups are "
        "against the original measured in the same table. The machine's 2 cores were shared with other jobs: "
        "absolute milliseconds move between tables, ratios within a table are the comparable numbers.")
    L.append("")
    L.append("## At R = 0.5")
    L.append("")
    L.append("Top-1 accuracy on the 10k test split (speedup over the original at batch 1 / batch 32).")
    L.append("")
    names = [res["model"] for res in results]
    methods = list(dict.fromkeys(r["method"] for res in results for r in res["rows"] if r["method"] != "original"))
    L.append("| method | " + " | ".join(names) + " |")
    L.append("| --- | " + " | ".join("---" for _ in names) + " |")
    L.append("| original | " + " | ".join(f"{res['base_accuracy']:.2%}" for res in results) + " |")
    for m in methods:
        cells = []
        for res in results:
            hit = [r for r in res["rows"] if r["method"] == m and abs(r["ratio"] - 0.5) < 1e-9]
            off = hit and abs(hit[0]["flops_reduction"] - _onnxprune_reduction(res, 0.5)) > 0.01
            cells.append(f"{hit[0]['accuracy']:.2%} ({hit[0]['speedup_b1']:.2f}x / {hit[0]['speedup_b32']:.2f}x)"
                         + (f" (*) at -{hit[0]['flops_reduction']:.1%}" if off else "") if hit else "n/a")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("(*): Torch-Pruning's channel counts move in steps too coarse to land within 1 point of onnxprune's "
             "FLOPs reduction; the reduction it reached is given. Per-model tables below have every R.")
    L.append("")
    for res in results:
        L.append(f"## {res['model']}")
        L.append("")
        L.append(f"Original: {res['base_accuracy']:.2%}, {res['base_macs'] / 1e6:.2f} M MACs, "
                 f"{res['base_params']:,} parameters." + (f" {res['note'][0].upper()}{res['note'][1:]}." if res["note"] else ""))
        if not res["has_bn"]:
            L.append("No BatchNorm in the torch module, so no BNScaleImportance rows.")
        L.append("")
        L.append("| method | R | FLOPs removed | params | accuracy | latency b1 ms (speedup) | latency b32 ms (speedup) | TP ratio |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in res["rows"]:
            if r["method"] == "original":
                name = "original (measured in this table)"
            else:
                name = r["method"]
                if abs(r["flops_reduction"] - _onnxprune_reduction(res, r["ratio"])) > 0.01:
                    name += " (*)"
            tpr = f"{r['tp_pruning_ratio']:.3f}" if "tp_pruning_ratio" in r else ""
            L.append(f"| {name} | {r['ratio']} | {r['flops_reduction']:.1%} | {r['params']:,} | {r['accuracy']:.2%} | "
                     f"{r['latency_b1_ms']:.3f} ({r['speedup_b1']:.2f}x) | {r['latency_b32_ms']:.2f} "
                     f"({r['speedup_b32']:.2f}x) | {tpr} |")
        L.append("")
        if any(r["method"] != "original" and abs(r["flops_reduction"] - _onnxprune_reduction(res, r["ratio"])) > 0.01
               for r in res["rows"]):
            L.append("(*): more than 1 point of FLOPs reduction away from onnxprune's at the same R; its channel "
                     "counts move in steps too coarse to land closer.")
            L.append("")
        L.append("Cost of the conversion, child processes with the same interpreter and imports "
                 f"(median of {res['cost'][0]['reps']} interleaved runs; wall time and peak RSS):")
        L.append("")
        L.append("| R | run | wall s | x plain | peak RSS MiB | x plain |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for c in res["cost"]:
            L.append(f"| {c['ratio']} | {c['run']} | {c['wall_seconds']:.2f} | {c['wall_vs_plain']:.2f}x | "
                     f"{c['peak_rss_mib']:.0f} | {c['rss_vs_plain']:.2f}x |")
        L.append("")
    return "\n".join(L) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(CASES))
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--onnxprune-python", default="/tmp/venv/bin/python",
                   help="interpreter whose venv has onnxprune's dependencies; runs this checkout's CLI")
    p.add_argument("--cost-reps", type=int, default=3, help="runs of each child for the conversion cost")
    p.add_argument("--tp-round-to", type=int, default=8,
                   help="also run TP's L1 variants with this round_to (onnxprune's default --round-to); 0: not")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="torch-pruning", help="results are written to OUT/DATE-NAME.md and .json")
    p.add_argument("--markdown-from", metavar="JSON", help="only rewrite the .md beside this results .json")
    args = p.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as f:
            d = json.load(f)
        with open(args.markdown_from[:-5] + ".md", "w") as f:
            f.write(markdown(d["results"], d["machine"], d["date"], d["command"]))
        return
    os.makedirs(WORK, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    info = machine()
    info["load_start"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    info["latency_sessions"] = LATENCY_SESSIONS
    start = time.perf_counter()
    results = []
    for name in args.models.split(","):
        results.append(run_case(CASES[name](), ratios, args.onnxprune_python, args.cost_reps, args.tp_round_to))
    info["seconds"] = time.perf_counter() - start
    info["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    stamp = datetime.date.today().isoformat()
    command = "/tmp/torchenv/bin/python bench/torch_pruning_bench.py " + " ".join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{stamp}-{args.name}")
    with open(base + ".md", "w") as f:
        f.write(markdown(results, info, stamp, command.strip()))
    with open(base + ".json", "w") as f:
        json.dump(dict(date=stamp, machine=info, command=command.strip(), results=results), f, indent=1)
    log(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
