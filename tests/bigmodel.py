"""A CNN with more weights than fit in one protobuf, written straight to external data.

    input (N, 3, 32, 32) -> Conv 3x3 to 64 channels -> Relu -> Flatten (65536 features)
    -> BRANCHES x [Gemm 65536 -> 512 -> Relu -> Gemm 512 -> 10] -> summed (N, 10)

Each wide Gemm holds 128 MiB of float32 weights, so 17 branches make 2.13 GiB
(2.28 GB): over the 2 GiB a protobuf can hold, in tensors of a sixteenth of the
total each, as in real models whose weight sits in many large layers. The
multiply-accumulates are almost all in the wide Gemms, proportional to their
weights. The weights are generated and written in slices, so that making the model
never needs more than a few MB of memory.
"""

from __future__ import annotations

import hashlib  # noqa: F401 (for the annotation)
import os
import sys
from typing import Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS, SIZE, HIDDEN, CLASSES = 64, 32, 512, 10
BRANCHES = 17
FEATURES = CHANNELS * SIZE * SIZE
ALIGN = 4096


def write(folder: str, branches: int = BRANCHES, seed: int = 0, name: str = "big.onnx",
          digest: Optional["hashlib._Hash"] = None) -> Tuple[str, int]:
    """Write the model to ``folder``/``name`` with its weights in ``name``.data; returns the
    model's path and the bytes of its weights. ``digest``, if given, is updated with the
    data file's bytes as they are written."""
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, name)
    location = name + ".data"
    inits, nodes = [], []
    offset = 0
    with open(os.path.join(folder, location), "wb") as data:

        def external(tensor_name: str, shape, fill) -> str:
            nonlocal offset
            pad = -offset % ALIGN
            data.write(b"\0" * pad)
            if digest is not None:
                digest.update(b"\0" * pad)
            offset += pad
            t = TensorProto(name=tensor_name, dims=shape, data_type=TensorProto.FLOAT)
            start = offset
            rows = max(1, (16 << 20) // (4 * int(np.prod(shape[1:]))))
            for r in range(0, shape[0], rows):
                block = fill((min(rows, shape[0] - r),) + tuple(shape[1:]))
                data.write(memoryview(block).cast("B"))
                if digest is not None:
                    digest.update(memoryview(block).cast("B"))
                offset += block.nbytes
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(start)), ("length", str(offset - start))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            return tensor_name

        def uniform(scale):
            def fill(shape):
                block = rng.random(shape, dtype=np.float32)
                block -= 0.5
                block *= 2 * scale
                return block
            return fill

        def inline(tensor_name: str, values: np.ndarray) -> str:
            inits.append(numpy_helper.from_array(values.astype(np.float32), tensor_name))
            return tensor_name

        conv_w = inline("conv.w", rng.normal(0, 1 / np.sqrt(27), (CHANNELS, 3, 3, 3)))
        conv_b = inline("conv.b", rng.normal(0, 0.1, CHANNELS))
        nodes += [helper.make_node("Conv", ["input", conv_w, conv_b], ["conv"], name="conv", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
                  helper.make_node("Flatten", ["relu"], ["flat"], name="flatten", axis=1)]
        total = None
        for i in range(branches):
            w = external(f"wide{i}.w", [HIDDEN, FEATURES], uniform(np.sqrt(3 / FEATURES)))
            b = inline(f"wide{i}.b", rng.normal(0, 0.1, HIDDEN))
            v = inline(f"head{i}.w", rng.normal(0, 1 / np.sqrt(HIDDEN), (CLASSES, HIDDEN)))
            c = inline(f"head{i}.b", rng.normal(0, 0.1, CLASSES))
            nodes += [helper.make_node("Gemm", ["flat", w, b], [f"wide{i}"], name=f"wide{i}", transB=1),
                      helper.make_node("Relu", [f"wide{i}"], [f"hidden{i}"], name=f"hidden{i}"),
                      helper.make_node("Gemm", [f"hidden{i}", v, c], [f"head{i}"], name=f"head{i}", transB=1)]
            if total is None:
                total = f"head{i}"
            else:
                nodes.append(helper.make_node("Add", [total, f"head{i}"], [f"sum{i}"], name=f"sum{i}"))
                total = f"sum{i}"
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path, branches * HIDDEN * FEATURES * 4


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates per sample, counted from the weights' shapes (this net only)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            total += int(np.prod(dims[n.input[1]])) * SIZE * SIZE
        elif n.op_type == "Gemm":
            total += int(np.prod(dims[n.input[1]]))
    return total


if __name__ == "__main__":
    print(write(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else BRANCHES))
