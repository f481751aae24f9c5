"""What onnxruntime's CPU convolutions give back when a residual block's widths are cut.

    python bench/block_speed.py [--batch 32] [--repeat 3]

Builds, for each stage of resnet20_fmnist (16 channels at 28x28, 32 at 14x14, 64 at 7x7), a
chain of three basic blocks (conv3x3 C->M, ReLU, conv3x3 M->C, Add, ReLU) at several inner
widths M, and with the residual stream C cut too, and times each against the full-width chain
as the report does (onnxprune.latency: median over fresh interleaved sessions, thread spinning
off; with --repeat N, the median of N such measurements). The chain's MACs fall in proportion
to C x M; the table says how much of that becomes speed. Random weights: only the time
matters. Writes bench/results/DATE-block-speed.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
# (stream C, map size, cut (stream, inner) widths): the inner width alone, then the stream with it
STAGES = ((16, 28, ((16, 12), (16, 8), (16, 4), (8, 16), (8, 8))),
          (32, 14, ((32, 24), (32, 16), (32, 8), (16, 32), (16, 16))),
          (64, 7, ((64, 48), (64, 32), (64, 16), (32, 64), (32, 32))))


def block_chain(channels: int, inner: int, size: int, blocks: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    x = "x"
    for b in range(blocks):
        for name, shape in ((f"w1_{b}", (inner, channels, 3, 3)), (f"w2_{b}", (channels, inner, 3, 3))):
            weights.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name))
        weights += [numpy_helper.from_array(np.zeros(inner, np.float32), f"b1_{b}"),
                    numpy_helper.from_array(np.zeros(channels, np.float32), f"b2_{b}")]
        nodes += [helper.make_node("Conv", [x, f"w1_{b}", f"b1_{b}"], [f"c1_{b}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c1_{b}"], [f"r1_{b}"]),
                  helper.make_node("Conv", [f"r1_{b}", f"w2_{b}", f"b2_{b}"], [f"c2_{b}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Add", [f"c2_{b}", x], [f"a_{b}"]),
                  helper.make_node("Relu", [f"a_{b}"], [f"y_{b}"])]
        x = f"y_{b}"
    graph = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", channels, size, size])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what every onnxruntime since 1.10 reads
    onnx.checker.check_model(model)
    return model


def _sample(channels: int, size: int) -> np.ndarray:
    return np.random.default_rng(1).random((channels, size, size), dtype=np.float32)


def main() -> None:
    from onnxprune import latency

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    lines = [f"# Residual blocks at cut widths, {datetime.date.today().isoformat()}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime "
             f"{__import__('onnxruntime').__version__}, CPU provider. Command: `python bench/block_speed.py "
             f"--batch {args.batch} --repeat {args.repeat}`", "",
             f"Three basic blocks (conv3x3 C->M, ReLU, conv3x3 M->C, Add, ReLU) at batch {args.batch}, "
             "full width C = M against the stream and inner widths cut to C' and M'; the chain's MACs "
             "are C'M' / C^2 of the full chain's.", "",
             "| C | map | C' (stream) | M' (inner) | MACs | ms full -> cut | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for channels, size, cuts in STAGES:
        full = block_chain(channels, channels, size)
        for stream, inner in cuts:
            cut = block_chain(stream, inner, size)
            # a cut stream takes fewer input channels: each chain gets its own sample
            runs = [latency.measure(full, cut, "x", _sample(channels, size), [args.batch], ["CPUExecutionProvider"],
                                    after_sample=_sample(stream, size))[0] for _ in range(args.repeat)]
            before = float(np.median([r.before_ms for r in runs]))
            after = float(np.median([r.after_ms for r in runs]))
            lines.append(f"| {channels} | {size}x{size} | {stream} | {inner} | {stream * inner / channels ** 2:.2f} | "
                         f"{before:.3f} -> {after:.3f} | {before / after:.2f}x |")
            print(lines[-1], flush=True)
    path = os.path.join(HERE, "results", f"{datetime.date.today().isoformat()}-block-speed.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
