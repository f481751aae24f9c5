"""prepare(): graph normalisations that change nothing the network computes."""

import numpy as np
import onnx
from onnx import numpy_helper

import tiny
from onnxprune.prepare import prepare
from surgery import outputs, rel_error, sample


def _int64(b: tiny.Builder, value) -> str:
    name = f"const{len(b.inits)}"
    b.inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
    return name


def _chunk_with_computed_bounds() -> onnx.ModelProto:
    """torch's ``x.chunk(2, dim=1)`` at opset 13+: Slice bounds computed from the channel count,
    Shape -> Gather(1) -> Add -> Div -> Mul, as the corpus ShuffleNetV2 has them. No
    intermediate shapes are stored, as torch writes none."""
    b = tiny.Builder(channels=3, size=8)
    x = b.relu(b.conv("input", 3, 8))
    c = b.node("Gather", [b.node("Shape", [x]), _int64(b, [1])], axis=0)
    half = b.node("Div", [b.node("Add", [c, _int64(b, [1])]), _int64(b, [2])])
    second = b.node("Slice", [x, half, b.node("Mul", [half, _int64(b, [2])]), _int64(b, [1])])
    y = b.conv(second, 4, 6)
    model = b.model(b.node("GlobalAveragePool", [y]), ["N", 6, 1, 1])
    del model.graph.value_info[:]
    return model


def test_shape_arithmetic_on_static_axes_folds_without_stored_shapes():
    # onnx-graphsurgeon folds Shape -> Gather only where it knows the tensor's shape; torch
    # stores no intermediate shapes, so the chunk's bounds stayed computed (the corpus
    # ShuffleNetV2 kept all 217 nodes) and no rule could read them
    model = _chunk_with_computed_bounds()
    prepared, log = prepare(model)
    inits = {t.name for t in prepared.graph.initializer}
    (slice_node,) = [n for n in prepared.graph.node if n.op_type == "Slice"]
    assert all(name in inits for name in slice_node.input[1:])
    assert not any(n.op_type == "Shape" for n in prepared.graph.node) and log.folded_nodes >= 5
    x = sample(model)
    assert rel_error(outputs(model, x), outputs(prepared, x)) < 1e-6
