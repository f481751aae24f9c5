"""Train, export and package the larger benchmark CNNs (AlexNet, MobileNetV1, ResNet-20, a wide VGG).

Usage (in a venv with torch==2.13.0, onnx, onnxruntime, numpy):

    python bench/make_bench_models.py              # build every model
    python bench/make_bench_models.py --only NAME  # build one (see MODELS below)

Everything is written to a cache folder OUTSIDE the repository, ``$ONNXPRUNE_BENCH``
(default ``~/.cache/onnxprune-bench``); for each model NAME:

    NAME.onnx        opset 13, input "input" float32 (N,1,28,28), output "logits" (N,10),
                     batch axis dynamic and named "N"; BatchNormalization folded into
                     the Conv before it (plain eval export with constant folding)
    NAME.pt          the torch state_dict; re-instantiate with bench/bench_models.py
    NAME_calib.npy   256 preprocessed TRAINING images, float32 (256,1,28,28), a seeded
                     random sample
    NAME_test.npz    the full 10k TEST split: x float32 (10000,1,28,28), y int64 (10000,)

plus ``manifest.json`` with parameters, MACs, ONNX op types, accuracies and
training times of every model built so far.

Conventions follow models/make_models.py: preprocessing is only pixel / 255
(no mean/std), Adam with a one-cycle schedule, batch 128, fixed seeds, and the
TorchScript ONNX exporter (dynamo=False).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "models"))
import bench_models  # noqa: E402  (bench/bench_models.py: the architectures)
import datasets  # noqa: E402  (models/datasets.py: offline MNIST / Fashion-MNIST)
from make_models import accuracy, ort_logits, preprocess, torch_logits  # noqa: E402  (shared with models/)

OPSET = 13
N_CALIB = 256
BATCH_SIZE = 128


def cache_dir() -> Path:
    """Output folder; overridable with the ONNXPRUNE_BENCH env var. Never inside the repo."""
    root = os.environ.get("ONNXPRUNE_BENCH") or os.path.join("~", ".cache", "onnxprune-bench")
    return Path(root).expanduser().resolve()


# --------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str  # also the key of bench_models.ARCHITECTURES
    dataset: str  # key of datasets.LOADERS
    epochs: int
    lr: float  # peak learning rate of the one-cycle schedule (Adam)
    seed: int


MODELS = {
    s.name: s
    for s in [
        # No BatchNorm in AlexNet, so a gentler peak LR than the BN models; with
        # its two Dropout(0.5) layers 2 epochs at lr 1e-3 stopped at 98.7-98.9%.
        Spec("alexnet_mnist", "mnist", epochs=3, lr=2e-3, seed=11),
        Spec("mobilenetv1_fmnist", "fashion_mnist", epochs=3, lr=3e-3, seed=12),
        Spec("resnet20_fmnist", "fashion_mnist", epochs=3, lr=5e-3, seed=13),
        Spec("vggwide_fmnist", "fashion_mnist", epochs=2, lr=3e-3, seed=14),
    ]
}


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Spec) -> float:
    """Train in place; return the wall-clock training time in seconds."""
    gen = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = (len(x) + BATCH_SIZE - 1) // BATCH_SIZE
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    # One-cycle schedule: near-converged accuracy in only 2-3 epochs.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch
    )
    # channels_last: on this 2-core CPU the NCHW depthwise/conv backward of
    # oneDNN was several times slower (MobileNetV1 at width 1.0 most of all);
    # channels_last is never slower here. Purely a memory layout: the weights
    # are converted back to contiguous NCHW before export and saving.
    model.to(memory_format=torch.channels_last)
    model.train()
    t_start = time.time()
    for epoch in range(spec.epochs):
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            xb = x[idx].contiguous(memory_format=torch.channels_last)
            yb = y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        print(
            f"  epoch {epoch + 1}/{spec.epochs}: loss {total_loss / len(x):.4f} "
            f"train-acc {correct / len(x):.4f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    train_s = time.time() - t_start
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return train_s


@torch.no_grad()
def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates per sample of Conv2d and Linear layers (the usual FLOPs)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        per_output = mod.weight[0].numel()  # (cin/groups)*kh*kw for Conv, in_features for Linear
        total += out[0].numel() * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    model(torch.zeros(1, 1, 28, 28))
    for h in handles:
        h.remove()
    return total


# --------------------------------------------------------------------------
# Export and packaging
# --------------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    """Call write(file object) on a temporary sibling, then rename it into place."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def export_onnx(model: nn.Module, path: Path) -> list[str]:
    """Plain eval export: the exporter folds every BN into its Conv, Dropout vanishes."""
    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    # The TorchScript exporter (dynamo=False) is deliberate, as in models/:
    # plain, predictable node patterns (Flatten+Gemm, GlobalAveragePool).
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    tmp = path.with_name(path.name + ".part")
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=OPSET,
        training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=True,
        dynamo=False,
    )
    onnx_model = onnx.load(str(tmp))
    onnx.checker.check_model(onnx_model, full_check=True)
    ops = sorted({n.op_type for n in onnx_model.graph.node})
    for unwanted in ("BatchNormalization", "Dropout"):
        if unwanted in ops:
            raise RuntimeError(f"{path.name}: {unwanted} left in the exported graph, ops={ops}")
    os.replace(tmp, path)
    return ops


def build(spec: Spec, out: Path) -> dict:
    print(f"== {spec.name} ({spec.dataset})", flush=True)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)

    x_train_u8, y_train, x_test_u8, y_test = datasets.LOADERS[spec.dataset]()
    x_train, x_test = preprocess(x_train_u8), preprocess(x_test_u8)

    model = bench_models.build(spec.name)
    n_params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model)
    print(f"  params {n_params}, MACs/sample {macs}", flush=True)
    train_s = train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), spec)

    onnx_path = out / f"{spec.name}.onnx"
    ops = export_onnx(model, onnx_path)
    print(f"  exported {onnx_path.name}: ops {ops}", flush=True)

    # Torch vs onnxruntime on the full test set: same predictions, close logits.
    t_logits = torch_logits(model, x_test)
    o_logits = ort_logits(onnx_path, x_test)
    max_diff = float(np.abs(t_logits - o_logits).max())
    disagree = int((t_logits.argmax(1) != o_logits.argmax(1)).sum())
    acc_t, acc_o = accuracy(t_logits, y_test), accuracy(o_logits, y_test)
    print(f"  test acc (10k) torch {acc_t:.4f} / onnxruntime {acc_o:.4f}; "
          f"max |logit diff| {max_diff:.2e}; argmax disagreements {disagree}", flush=True)
    if max_diff > 1e-3:
        raise RuntimeError(f"{spec.name}: ONNX export disagrees with torch (max diff {max_diff})")

    # State dict, checked to load back into a fresh bench_models instance.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    pt_path = out / f"{spec.name}.pt"
    _atomic(pt_path, lambda f: torch.save(state, f))
    reloaded = bench_models.build(spec.name)
    reloaded.load_state_dict(torch.load(pt_path, weights_only=True))
    if not np.array_equal(torch_logits(reloaded, x_test[:1000]), t_logits[:1000]):
        raise RuntimeError(f"{spec.name}: reloaded state_dict gives different logits")

    # Random (seeded) rather than the first 256 so that every class is present
    # in roughly its natural proportion; kept in increasing index order.
    rng = np.random.default_rng(spec.seed)
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    _atomic(out / f"{spec.name}_calib.npy", lambda f: np.save(f, x_train[calib_idx]))
    _atomic(out / f"{spec.name}_test.npz",
            lambda f: np.savez_compressed(f, x=x_test, y=y_test.astype(np.int64)))
    print(f"  calib: {N_CALIB} train images (indices {calib_idx[:4].tolist()}...), "
          f"test: {len(x_test)} images", flush=True)
    return dict(
        name=spec.name, dataset=spec.dataset, params=n_params, macs=macs, epochs=spec.epochs,
        lr=spec.lr, seed=spec.seed, train_seconds=round(train_s, 1), onnx_ops=ops,
        test_acc_torch=acc_t, test_acc_onnxruntime=acc_o, max_logit_diff=max_diff,
        torch_version=torch.__version__, onnxruntime_version=ort.__version__,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(MODELS), help="build just this model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    out = cache_dir()
    if out == REPO or REPO in out.parents:
        sys.exit(f"refusing to write into the repository ({out}); point ONNXPRUNE_BENCH elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    print(f"output: {out}")

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    names = [args.only] if args.only else list(MODELS)
    for n in names:
        manifest[n] = build(MODELS[n], out)
        _atomic(manifest_path, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))

    print("\nsummary:")
    for n in names:
        r = manifest[n]
        print(f"  {n:20s} params {r['params']:>8d}  MACs {r['macs']:>10d}  "
              f"test acc {r['test_acc_onnxruntime']:.4f}  train {r['train_seconds']:.0f}s")


if __name__ == "__main__":
    main()
