"""Sanity checks for the packaged models; needs only numpy, onnx, onnxruntime, pillow.

    python models/check_models.py [--full-test]

For every NAME.onnx next to this file:
  * onnx.checker.check_model(full_check=True) passes; op types are listed;
  * the model runs on a batch of 7 images (dynamic batch axis);
  * accuracy on NAME_test.npz (and with --full-test on the whole test split,
    fetched through datasets.py);
  * every calibration PNG is a training-split image, and loading it with
    Pillow and dividing by 255 reproduces the training tensor bit for bit;
  * parameter count (initializer elements) and MACs of Conv/Gemm for one image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import datasets  # noqa: E402
from evaluate import evaluate  # noqa: E402

# Which data set each packaged model was trained on (see make_models.MODELS).
DATASET = {"mnist_cnn": "mnist", "fmnist_resnet": "fashion_mnist"}


def macs_per_image(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv and Gemm/MatMul nodes for batch size 1."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in list(model.graph.input) + list(model.graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_value = 1
    model = shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    }
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes.update(inits)
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # (Cout, Cin/group, kh, kw)
            out = shapes[node.output[0]]  # (1, Cout, H, W)
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes[node.input[0]]
            out = shapes[node.output[0]]
            k = a[0] if any(a.name == "transA" and a.i for a in node.attribute) else a[-1]
            total += int(np.prod(out)) * k
    return total


def check_calib(calib_dir: Path, x_train_u8: np.ndarray) -> int:
    """Every PNG must be a training image and reproduce its float tensor exactly."""
    index = {img.tobytes(): i for i, img in enumerate(x_train_u8)}
    files = sorted(calib_dir.glob("*.png"))
    for f in files:
        img = Image.open(f)
        assert img.mode == "L" and img.size == (28, 28), (f, img.mode, img.size)
        arr = np.asarray(img)
        i = index.get(arr.tobytes())
        assert i is not None, f"{f} is not a training-split image"
        loaded = arr.astype(np.float32) / np.float32(255.0)
        trained = x_train_u8[i].astype(np.float32) / np.float32(255.0)
        assert np.array_equal(loaded, trained)
    return len(files)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-test", action="store_true", help="also score the full test split")
    args = parser.parse_args(argv)

    for path in sorted(HERE.glob("*.onnx")):
        name = path.stem
        print(f"== {name}")
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        print(f"  opset {model.opset_import[0].version}, ops {sorted({n.op_type for n in model.graph.node})}")
        n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(f"  initializer elements {n_params}, MACs/image {macs_per_image(model):,}")

        with np.load(HERE / f"{name}_test.npz") as d:
            x, y = d["x"], d["y"]
        assert x.dtype == np.float32 and x.shape == (1000, 1, 28, 28), (x.dtype, x.shape)
        assert y.dtype == np.int64 and y.shape == (1000,), (y.dtype, y.shape)
        assert 0.0 <= x.min() and x.max() <= 1.0

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(["logits"], {"input": x[:7]})[0]
        assert out.shape == (7, 10) and out.dtype == np.float32, (out.shape, out.dtype)
        print(f"  batch of 7 -> {out.shape}; test subset acc {evaluate(str(path), str(HERE / f'{name}_test.npz')):.4f}")

        x_train_u8, _, x_test_u8, y_test = datasets.LOADERS[DATASET[name]]()
        # The subset must be exactly the first 1000 test images, pixel / 255.
        assert np.array_equal(x[:, 0], x_test_u8[:1000].astype(np.float32) / np.float32(255.0))
        assert np.array_equal(y, y_test[:1000])
        n = check_calib(HERE / f"{name}_calib", x_train_u8)
        print(f"  {n} calibration PNGs match training images exactly")

        if args.full_test:
            xt = (x_test_u8.astype(np.float32) / np.float32(255.0))[:, None]
            preds = np.concatenate(
                [sess.run(["logits"], {"input": xt[i : i + 256]})[0].argmax(1) for i in range(0, len(xt), 256)]
            )
            print(f"  full test acc (onnxruntime) {(preds == y_test).mean():.4f}")


if __name__ == "__main__":
    main()
