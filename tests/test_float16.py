"""float16 models: statistics, refit and --bn-correct keep the model's own type."""

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

import onnxprune
import tiny
from surgery import outputs


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def _float16_types(model: onnx.ModelProto) -> set:
    return {t.data_type for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def test_channel_sums_past_the_float16_range_are_no_overflow():
    # every activation is finite (about 40 at most), but a channel's sum over one 64x64 image
    # is past 65504, the largest float16
    b = tiny.Builder(channels=3, size=64, seed=0)
    w1 = b.init(np.abs(b.rng.normal(1.0, 0.2, (8, 3, 1, 1))))
    x = b.relu(b.node("Conv", ["input", w1], kernel_shape=[1, 1]))
    x = b.relu(b.conv(x, 8, 8, k=1))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    model = _half(b.model(b.gemm(x, 8, 5), ["N", 5]))
    xs = np.random.default_rng(0).normal(10, 1, (16, 3, 64, 64)).astype(np.float16)
    result = onnxprune.prune(model, xs, onnxprune.PruneOptions(flops=0.3, latency=False))
    assert result.report.flops_reduction >= 0.3
    assert _float16_types(result.model) == {TensorProto.FLOAT16}
    y0, y1 = outputs(model, xs)[0].astype(np.float64), outputs(result.model, xs)[0].astype(np.float64)
    assert np.isfinite(y1).all() and np.linalg.norm(y1 - y0) < 0.5 * np.linalg.norm(y0)


def test_bn_correct_keeps_float16_weights():
    model = _half(tiny.plain_cnn())
    xs = np.random.default_rng(0).random((64, 3, 8, 8)).astype(np.float16)
    result = onnxprune.prune(model, xs, onnxprune.PruneOptions(flops=0.4, latency=False, bn_correct=True))
    assert any("BN drift corrected" in n for n in result.report.notes)
    assert _float16_types(result.model) == {TensorProto.FLOAT16}
    assert np.isfinite(outputs(result.model, xs)[0]).all()


def test_output_payoff_gates_a_float16_model_in_its_own_type():
    model = _half(tiny.plain_cnn())
    xs = np.random.default_rng(0).random((48, 3, 8, 8)).astype(np.float16)
    opts = onnxprune.PruneOptions(flops=0.3, latency=False, payoff="output", budget=200)
    result = onnxprune.prune(model, xs, opts)
    assert result.report.flops_reduction >= 0.3
    assert _float16_types(result.model) == {TensorProto.FLOAT16}
    assert np.isfinite(outputs(result.model, xs)[0]).all()
