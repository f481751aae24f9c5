"""Top-1 accuracy of an ONNX classifier on a labelled test subset.

    python models/evaluate.py MODEL.onnx TEST.npz [--batch-size 256]

TEST.npz holds ``x`` (already preprocessed model input, float32 (N,1,28,28))
and ``y`` (int64 labels), as written by make_models.py. Needs only numpy and
onnxruntime (CPU provider), so it runs in the project's runtime venv.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort


def evaluate(model_path: str, test_path: str, batch_size: int = 256) -> float:
    """Return the top-1 accuracy of ``model_path`` on the (x, y) arrays in ``test_path``."""
    with np.load(test_path) as data:
        x, y = data["x"], data["y"]
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    # Use the graph's own input/output names rather than assuming "input"/"logits",
    # so pruned or otherwise rewritten models can be scored too.
    in_name = sess.get_inputs()[0].name
    out_name = sess.get_outputs()[0].name
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = sess.run([out_name], {in_name: x[i : i + batch_size]})[0]
        correct += int((logits.argmax(axis=1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Top-1 accuracy of an ONNX model on a test .npz")
    parser.add_argument("model", help="path to the .onnx model")
    parser.add_argument("test", help="path to the .npz with x (inputs) and y (labels)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    acc = evaluate(args.model, args.test, args.batch_size)
    print(f"top-1 accuracy: {acc:.4f}")


if __name__ == "__main__":
    main()
