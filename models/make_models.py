"""Train, export and package the small reference CNNs used to exercise onnxprune.

Usage (in a venv with torch==2.13.0, onnx, onnxruntime, numpy, pillow):

    python models/make_models.py              # build every model
    python models/make_models.py --only NAME  # build one (see MODELS below)

For each model NAME this writes, next to this file:

    NAME.onnx        opset 13, input "input" float32 (N,1,28,28), output "logits" (N,10),
                     batch axis dynamic and named "N"
    NAME_calib/      256 greyscale 28x28 PNGs (00000.png ...) from the TRAINING split
    NAME_test.npz    x: first 1000 TEST images, preprocessed (float32 (1000,1,28,28));
                     y: their int64 labels

Preprocessing everywhere is just pixel / 255 in float32 (no mean/std
normalisation), so a calibration PNG loaded with Pillow and divided by 255
is exactly what the model saw during training.

Everything is seeded; on the same machine / torch build a rerun reproduces the
same weights (across machines, thread counts or CPU kernels tiny float
differences in training can still change the final weights slightly).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import datasets  # noqa: E402  (sibling module, imported after the path tweak)

OPSET = 13
N_CALIB = 256
N_TEST_SUBSET = 1000


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias: the BN that follows supplies it) + BN + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class MnistCNN(nn.Module):
    """Plain VGG-style CNN: 4 conv-BN-ReLU, 2 max-pools, 2 fully connected layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = ConvBNReLU(1, 32)
        self.block2 = ConvBNReLU(32, 32)
        self.block3 = ConvBNReLU(32, 64)
        self.block4 = ConvBNReLU(64, 64)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(x))
        x = F.max_pool2d(x, 2)  # 28 -> 14
        x = self.block4(self.block3(x))
        x = F.max_pool2d(x, 2)  # 14 -> 7
        x = torch.flatten(x, 1)  # exports as an ONNX Flatten node (axis=1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block; 1x1 conv + BN projection when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class SmallResNet(nn.Module):
    """CIFAR-style ResNet-14 (3 stages x 2 basic blocks, widths 16/32/64)."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks_per_stage: int = 2):
        super().__init__()
        self.stem_conv = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1  # 28 -> 14 -> 7
                blocks.append(BasicBlock(cin, w, stride))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)  # exports as GlobalAveragePool
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    dataset: str  # key of datasets.LOADERS
    build: Callable[[], nn.Module]
    epochs: int
    lr: float  # peak learning rate of the one-cycle schedule (Adam)
    keep_bn: bool  # export BatchNormalization nodes instead of folding them into Conv
    seed: int


MODELS = {
    s.name: s
    for s in [
        Spec("mnist_cnn", "mnist", MnistCNN, epochs=2, lr=3e-3, keep_bn=True, seed=1),
        Spec("fmnist_resnet", "fashion_mnist", SmallResNet, epochs=2, lr=5e-3, keep_bn=False, seed=2),
    ]
}


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> float32 (N,1,28,28) in [0,1]; the only preprocessing used."""
    return (images_u8.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Spec, batch_size: int = 128):
    gen = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    # One-cycle schedule: gets near-converged accuracy in only 1-2 epochs.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(spec.epochs):
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
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
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def ort_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [sess.run(["logits"], {"input": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


# --------------------------------------------------------------------------
# Export and packaging
# --------------------------------------------------------------------------


def export_onnx(model: nn.Module, spec: Spec, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    if spec.keep_bn:
        # The TorchScript exporter folds BN into the preceding Conv in its
        # eval-mode peephole pass. TrainingMode.PRESERVE skips that pass (and
        # constant folding) while still exporting the ops as the module is
        # currently set, i.e. inference-mode BatchNormalization using the
        # running statistics, since the model is in eval().
        training = torch.onnx.TrainingMode.PRESERVE
    else:
        training = torch.onnx.TrainingMode.EVAL
    # The TorchScript exporter (dynamo=False) is deliberate: it gives plain,
    # predictable node patterns (Flatten+Gemm, GlobalAveragePool, BN on request).
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=OPSET,
        training=training,
        # Constant folding is only applied in EVAL mode anyway; turning it off
        # explicitly for PRESERVE silences a (here irrelevant) torch warning.
        do_constant_folding=not spec.keep_bn,
        dynamo=False,
    )
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    ops = sorted({n.op_type for n in onnx_model.graph.node})
    has_bn = "BatchNormalization" in ops
    if has_bn != spec.keep_bn:
        raise RuntimeError(f"{spec.name}: expected BatchNormalization kept={spec.keep_bn}, ops={ops}")
    print(f"  exported {path.name}: ops {ops}")


def write_calib(images_u8: np.ndarray, spec: Spec, out_dir: Path) -> np.ndarray:
    """Write N_CALIB training images as PNGs; return the training indices used."""
    rng = np.random.default_rng(spec.seed)
    # Random (seeded) rather than the first 256 so that every class is present
    # in roughly its natural proportion; kept in increasing index order.
    idx = np.sort(rng.choice(len(images_u8), size=N_CALIB, replace=False))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for k, i in enumerate(idx):
        Image.fromarray(images_u8[i]).save(out_dir / f"{k:05d}.png", optimize=True)
    return idx


def build(spec: Spec) -> dict:
    print(f"== {spec.name} ({spec.dataset})", flush=True)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)

    x_train_u8, y_train, x_test_u8, y_test = datasets.LOADERS[spec.dataset]()
    x_train, x_test = preprocess(x_train_u8), preprocess(x_test_u8)

    model = spec.build()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  params: {n_params}")
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), spec)

    onnx_path = HERE / f"{spec.name}.onnx"
    export_onnx(model, spec, onnx_path)

    # Torch vs onnxruntime on the full test set: same predictions, close logits.
    t_logits = torch_logits(model, x_test)
    o_logits = ort_logits(onnx_path, x_test)
    max_diff = float(np.abs(t_logits - o_logits).max())
    acc_t, acc_o = accuracy(t_logits, y_test), accuracy(o_logits, y_test)
    sub_t = accuracy(t_logits[:N_TEST_SUBSET], y_test[:N_TEST_SUBSET])
    sub_o = accuracy(o_logits[:N_TEST_SUBSET], y_test[:N_TEST_SUBSET])
    print(f"  test acc torch {acc_t:.4f} / onnxruntime {acc_o:.4f}; "
          f"first-{N_TEST_SUBSET} subset torch {sub_t:.4f} / onnxruntime {sub_o:.4f}; "
          f"max |logit diff| {max_diff:.2e}")
    if max_diff > 1e-3:
        raise RuntimeError(f"{spec.name}: ONNX export disagrees with torch (max diff {max_diff})")

    calib_idx = write_calib(x_train_u8, spec, HERE / f"{spec.name}_calib")
    np.savez_compressed(
        HERE / f"{spec.name}_test.npz",
        x=x_test[:N_TEST_SUBSET],
        y=y_test[:N_TEST_SUBSET].astype(np.int64),
    )
    print(f"  calib: {N_CALIB} PNGs (train indices {calib_idx[:4].tolist()}...), "
          f"test subset: {N_TEST_SUBSET} images")
    return dict(name=spec.name, params=n_params, acc=acc_o, subset_acc=sub_o)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(MODELS), help="build just this model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [args.only] if args.only else list(MODELS)
    results = [build(MODELS[n]) for n in names]
    print("\nsummary:")
    for r in results:
        print(f"  {r['name']:15s} params {r['params']:>8d}  test acc {r['acc']:.4f}  "
              f"subset acc {r['subset_acc']:.4f}")


if __name__ == "__main__":
    main()
