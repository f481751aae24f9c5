"""The convolutions onnxruntime's CPU provider runs, against those the model holds: a pruned
layer whose filters are not a whole number of channel blocks runs padded, and the report says so."""

import platform

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.kernels import conv_kernels
from onnxprune.report import Report
from surgery import analysis_of, input_shape, prune_players
from tiny import Builder

# onnxruntime pads to its NCHWc blocks (8 or 16 channels) on x86 only
X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU = ["CPUExecutionProvider"]


def three_convs():
    b = Builder(channels=3, size=16)
    x = b.relu(b.conv("input", 3, 16))
    x = b.relu(b.conv(x, 16, 16))
    x = b.relu(b.conv(x, 16, 16))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.model(b.gemm(x, 16, 10), ["N", 10])


def _input_shapes(model):
    return {model.graph.input[0].name: (1,) + input_shape(model)[1:]}


@pytest.mark.skipif(not X86, reason="onnxruntime's NCHWc convolutions are x86's")
def test_a_conv_keeping_12_of_16_filters_runs_16():
    model = three_convs()
    second = [n.name for n in model.graph.node if n.op_type == "Conv"][1]
    _, analysis = analysis_of(model)
    group = next(g.index for g in analysis.groups if second in g.producers)
    pruned = prune_players(model, {group: [0, 5, 9, 14]})

    whole = conv_kernels(model, _input_shapes(model), CPU)
    assert [c.run for c in whole.convs] == [c.held for c in whole.convs]  # 16 filters: whole blocks either way
    assert whole.executed == whole.counted

    cut = conv_kernels(pruned, _input_shapes(pruned), CPU)
    row = next(c for c in cut.convs if c.name == second)
    assert row.held == (12, 16, 3, 3) and row.run == (16, 16, 3, 3) and row.padded
    assert row.executed == row.counted * 16 // 12
    assert cut.executed > cut.counted
    assert cut.counted < whole.counted and cut.executed < whole.executed  # its consumer still reads 12
    # that consumer reads 12 channels, under a block: onnxruntime converts the padded output back
    assert cut.layout_changes > whole.layout_changes

    assert conv_kernels(model, _input_shapes(model), ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def _unnamed_with_a_constant_weight():
    """three_convs with no node names and the middle conv's weight in a Constant node, as some
    exporters write them: the report must read the prepared model, which names and folds them."""
    model = three_convs()
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [weight.name], value=weight))
    for n in model.graph.node:
        n.name = ""
    return model


def test_pruning_with_latency_reports_the_kernels_macs():
    model = _unnamed_with_a_constant_weight()
    x = np.random.default_rng(0).normal(size=(48, 3, 16, 16)).astype(np.float32)
    result = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.4, round_to=1, latency_batch=4, device="cpu"))
    k = result.report.kernel_macs
    assert k["counted_before"] == 16 * 16 * 9 * (16 * 3 + 2 * 16 * 16)  # three convs on 16x16 maps
    assert k["counted_after"] < k["counted_before"]
    assert k["executed_before"] >= k["counted_before"] and k["executed_after"] >= k["counted_after"]
    if X86:
        assert k["executed_before"] == k["counted_before"]  # 16 filters each: whole blocks
        held = {c.name: c for c in conv_kernels(result.model, _input_shapes(result.model), CPU).convs}
        # listed: every pruned conv that runs padded, with what it holds and what it runs
        assert k["padded"] and {p["layer"] for p in k["padded"]} == {n for n, c in held.items() if c.padded}
        for p in k["padded"]:
            assert p["held"] == list(held[p["layer"]].held[:2]) and p["run"] == list(held[p["layer"]].run[:2])
            assert p["run"][0] > p["held"][0] or p["run"][1] > p["held"][1]
        assert k["executed_after"] == sum(c.executed for c in held.values()) > k["counted_after"]


def test_kernels_that_cannot_be_read_leave_the_conversion_alone(monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("onnxprune.api.conv_kernels", full_disk)
    x = np.random.default_rng(0).normal(size=(48, 3, 16, 16)).astype(np.float32)
    result = onnxprune.prune(three_convs(), x, onnxprune.PruneOptions(flops=0.4, latency_batch=4, device="cpu"))
    assert result.report.flops_reduction > 0.39 and result.report.latency
    assert result.report.kernel_macs is None
    assert any("were not read: No space left on device" in n for n in result.report.notes)


def test_summary_names_the_padded_layers_and_is_silent_where_kernels_match():
    padded = dict(counted_before=1000, executed_before=1000, counted_after=500, executed_after=600,
                  padded=[dict(layer="conv1", held=[8, 16], run=[16, 16]), dict(layer="conv2", held=[16, 12], run=[16, 16])])
    text = Report(macs_before=1, macs_after=1, fidelity_relative_error=0.0, kernel_macs=padded).format_text()
    assert ("CPU kernels: onnxruntime's convolutions run 40.0% fewer multiply-accumulates than the original's "
            "(50.0% fewer counted); it pads 2 pruned layers to whole channel blocks (conv1 8 -> 16 filters, "
            "conv2 12 -> 16 inputs)") in text
    both = dict(padded, padded=[dict(layer="conv3", held=[24, 28], run=[32, 32])])
    assert "(conv3 24x28 -> 32x32 filters x inputs)" in Report(macs_before=1, macs_after=1, fidelity_relative_error=0.0,
                                                                 kernel_macs=both).format_text()
    same = dict(padded, executed_after=500, padded=[], layout_changes_before=1, layout_changes_after=1)
    assert "CPU kernels" not in Report(macs_before=1, macs_after=1, fidelity_relative_error=0.0, kernel_macs=same).format_text()
    converted = dict(same, layout_changes_after=4)
    assert ("(50.0% fewer counted); it converts 3 more tensors between its blocked layout and the plain one, "
            "for layers reading part of a block") in Report(macs_before=1, macs_after=1, fidelity_relative_error=0.0,
                                                            kernel_macs=converted).format_text()
