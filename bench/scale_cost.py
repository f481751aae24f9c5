"""What a conversion costs at a realistic input size, in plain onnxruntime passes.

The accuracy benchmark's networks read 28x28 images: a pass over 256 of them takes
20-40 ms, and fixed costs (sessions, Python, the solves) dominate every ratio. This
script times the same stages on ImageNet-sized torchvision networks (224x224, random
weights and random inputs: the costs, not the accuracy, are the point):

    python bench/scale_cost.py --export     # in a venv with torch + torchvision: writes the ONNX files
    python bench/scale_cost.py [--images 256] [--ratio 0.5] [--device cpu|cuda]   # onnxprune's venv: times them

(The committed results used files exported with torch 2.15.0 and torchvision 0.29.2,
the TorchScript exporter, opset 17.) Models go to ``$ONNXPRUNE_BENCH/scale`` (default ``~/.cache/onnxprune-bench/scale``).
For each model: a plain pass (a session with onnxruntime's default options over the
calibration images, at the fastest of batch 8, 16 and 32), then the conversion with the local payoff and no
recovery (calibrate + score: SNPFI's scoring cost) and the default conversion (with
recovery), each stage as a multiple of the plain pass. Then the same from a folder of
JPEGs, as users pass calibration data: ``--images`` synthetic 500x375 photos (the median
ImageNet size; smooth colour fields plus noise, quality 90, seeded), where a plain pass
decodes, resizes and crops every image (run_bench.plain_pass_seconds: onnxprune's own
loader, a fresh one per pass) and runs it at the batch size found fastest above. --device cuda
runs the plain passes and the conversions on onnxruntime's CUDA provider (the default is the CPU
provider whatever the machine has). Writes bench/results/DATE-scale-cost.md (DATE-scale-cost-cuda.md
with --device cuda).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.environ.get("ONNXPRUNE_BENCH", os.path.expanduser("~/.cache/onnxprune-bench")), "scale")
MODELS = ("resnet18", "mobilenet_v2")
# The plain pass is the fastest of these batch sizes (twice each): onnxprune runs its pass over
# the original model for the refit a few images at a time where activations are large, and on
# MobileNetV2 at 224x224 onnxruntime is 15-20% faster in batches of 4 to 8 than of 32.
PLAIN_BATCHES = (8, 16, 32)


def export() -> None:
    import torch
    import torchvision

    os.makedirs(CACHE, exist_ok=True)
    torch.manual_seed(0)
    for name in MODELS:
        model = getattr(torchvision.models, name)(num_classes=1000).eval()
        path = model_path(name)
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
        print(f"wrote {path}")


def model_path(name: str) -> str:
    """The exported ONNX file of one of MODELS."""
    return os.path.join(CACHE, f"{name}_224.onnx")


def write_jpegs(folder: str, images: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        field = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(field, np.int16) + rng.integers(-20, 21, (375, 500, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def measure(images: int, ratio: float, device: str = "cpu") -> None:
    import tempfile

    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, os.path.dirname(HERE))
    import onnxprune
    from onnxprune.runtime import choose_providers
    from run_bench import machine_text, plain_pass_seconds  # decodes in every timed pass: a fresh set each

    providers, provider_text = choose_providers(device)

    rows = []
    jpegs = tempfile.TemporaryDirectory(prefix="onnxprune-scale-")
    write_jpegs(jpegs.name, images)
    for name in MODELS:
        path = model_path(name)
        cal = np.random.default_rng(0).random((images, 3, 224, 224), dtype=np.float32)
        sess = ort.InferenceSession(path, providers=providers)
        sess.run(None, {"x": cal[:32]})  # warm
        passes = {}
        # one batch size after another, each twice: on the CUDA provider a session re-picks its
        # convolution kernels whenever the batch size changes, which made MobileNetV2's pass
        # 24 times slower where the sizes were interleaved
        for batch in PLAIN_BATCHES:
            for _ in range(2):
                start = time.perf_counter()
                for s in range(0, images, batch):
                    sess.run(None, {"x": cal[s:s + batch]})
                passes[batch] = min(passes.get(batch, float("inf")), time.perf_counter() - start)
        batch = min(passes, key=passes.get)
        plain = passes[batch]
        del sess
        for recover in (False, True):
            start = time.perf_counter()
            r = onnxprune.prune(path, cal, onnxprune.PruneOptions(flops=ratio, recover=recover, latency=False,
                                                                  device=device))
            wall = time.perf_counter() - start
            s = r.report.seconds
            rows.append(_row(name, "random array", recover, plain, batch, s, wall, r.report.flops_reduction))
        plain = plain_pass_seconds(path, jpegs.name, repeats=2, batch_size=batch, providers=providers)
        for recover in (False, True):
            start = time.perf_counter()
            r = onnxprune.prune(path, jpegs.name, onnxprune.PruneOptions(flops=ratio, recover=recover, latency=False,
                                                                         device=device))
            wall = time.perf_counter() - start
            rows.append(_row(name, f"{images} JPEGs", recover, plain, batch, r.report.seconds, wall,
                             r.report.flops_reduction))
    jpegs.cleanup()
    stamp = datetime.date.today().isoformat()
    out = os.path.join(HERE, "results", f"{stamp}-scale-cost{'-cuda' if device == 'cuda' else ''}.md")
    with open(out, "w") as f:
        f.write(f"# Conversion cost at 224x224, {stamp}\n\nMachine: {machine_text(device)}; "
                f"onnxruntime {ort.__version__}, {provider_text}. Command: `python bench/scale_cost.py --images "
                f"{images} --ratio {ratio}{' --device cuda' if device == 'cuda' else ''}` (torchvision networks, random weights: costs only; inputs a random array, then a folder of synthetic JPEGs decoded by every pass).\n\n"
                "| model | calibration input | recovery | plain pass | calibrate + score | refit | verify | whole conversion | FLOPs |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    print(f"wrote {out}")


def _row(name, given, recover, plain, batch, s, wall, reduction) -> str:
    row = (f"| {name} | {given} | {'on' if recover else 'off (local payoff)'} | {plain:.2f} s (batch {batch}) | "
           f"{(s.get('calibrate', 0) + s.get('score_allocate', 0)) / plain:.2f}x | "
           f"{s.get('refit', 0) / plain:.2f}x | {s.get('verify', 0) / plain:.2f}x | {wall / plain:.2f}x | "
           f"-{reduction:.1%} |")
    print(row, flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="store_true", help="write the ONNX files (needs torch and torchvision)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args()
    if args.export:
        export()
    else:
        measure(args.images, args.ratio, args.device)


if __name__ == "__main__":
    main()
