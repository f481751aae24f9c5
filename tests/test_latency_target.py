"""--latency R: allocated on a model of per-layer timings, then steered by timing the whole pruned model."""

import json
import os

import numpy as np
import onnx
import pytest

from onnxprune.cli import run
from onnxprune.latency_model import LatencyModel
from onnxprune.load import default_opset
from onnxprune.runtime import choose_providers
from surgery import analysis_of
from tiny import residual_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "models", "mnist_cnn")


def test_latency_model_times_every_layer_and_adds_up_to_the_whole_model():
    prepared, analysis = analysis_of(residual_cnn())
    providers, _ = choose_providers("cpu")
    sample = np.zeros(tuple(d.dim_value for d in prepared.graph.input[0].type.tensor_type.shape.dim[1:]), np.float32)
    model = LatencyModel(analysis, prepared, prepared.graph.input[0].name, sample, 4, providers, 8, 0.1,
                         default_opset(prepared))
    assert model.fallback_layers == []
    assert len(model.layers) == len(analysis.mac_nodes)
    everything = np.ones(analysis.num_players, dtype=bool)
    layer_sum = sum(seconds for _, _, seconds, _, _ in model.layers)
    assert model.macs(everything) == round(1e9 * max(model.whole_seconds, layer_sum))
    # fewer channels are never modelled slower
    fewer = everything.copy()
    fewer[np.flatnonzero(analysis.player_group == analysis.prunable_groups()[0].index)[1:]] = False
    assert model.macs(fewer) <= model.macs(everything)


def test_cli_latency_target_is_met_on_the_modelled_latency(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = run([BASE + ".onnx", str(out), "--calib", BASE + "_calib", "--latency", "0.4", "--max-images", "64",
                "--latency-batch", "8", "--report", str(report)])
    assert code == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(report.read_text())
    lm = data["latency_model"]
    assert lm["batch"] == 8 and lm["layers_timed"] == 6 and lm["layers_costed_by_macs"] == []
    # the allocations tried, each timed whole: the first asks the model for the target itself
    assert 1 <= len(lm["steps"]) <= 4 and lm["steps"][0][0] == 0.4
    assert data["latency_target"] == 0.4 and data["flops_reduction"] > 0
    assert [row["batch"] for row in data["latency"]] == [1, 8]  # measured too, beside the model
    assert "latency target -40% at batch 8" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--latency", "0.4", "--flops", "0.4"], "either --flops or --latency"),
    (["--latency", "1.5"], "--latency must be in (0, 1)"),
    (["--latency", "0.4", "--method", "bottleneck"], "--latency works with --method snpfi"),
])
def test_latency_target_usage_errors(args, message, tmp_path, capsys):
    code = run([BASE + ".onnx", str(tmp_path / "o.onnx"), "--calib", BASE + "_calib"] + args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_latency_aware_allocation_still_meets_the_flops_target(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = run([BASE + ".onnx", str(out), "--calib", BASE + "_calib", "--flops", "0.5", "--latency-aware",
                "--max-images", "64", "--latency-batch", "8", "--no-latency", "--report", str(report)])
    assert code == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(report.read_text())
    assert 0.5 <= data["flops_reduction"] <= 0.51
    assert "latency_model" in data["seconds"]


def test_latency_aware_needs_a_flops_target(tmp_path, capsys):
    code = run([BASE + ".onnx", str(tmp_path / "o.onnx"), "--calib", BASE + "_calib", "--latency", "0.3",
                "--latency-aware"])
    assert code == 2 and "--latency-aware goes with --flops" in capsys.readouterr().err


class _Alloc:
    def __init__(self, share):
        self.keep_player = share  # stands for the allocation made for this share


@pytest.mark.parametrize("speed_per_share, reachable", [(0.7, True), (1.3, True), (None, False)])
def test_latency_target_is_steered_by_measurement(speed_per_share, reachable):
    from onnxprune.api import STEER_TOLERANCE, STEER_TRIES, steer_to_measured_latency

    def measured(share):  # the whole model gains less (or more) than the layer model says; or saturates
        return speed_per_share * share if speed_per_share else min(0.3, 0.5 * share)

    asked = []

    def allocate_at(share):
        asked.append(share)
        return _Alloc(share), None, 0

    (chosen, _, _), steps = steer_to_measured_latency(allocate_at, 0.4, measured)
    assert len(steps) <= STEER_TRIES and [s for s, _ in steps] == [round(a, 4) for a in asked]
    if reachable:
        assert abs(measured(chosen.keep_player) - 0.4) <= STEER_TOLERANCE
    else:  # the fastest allocation tried, and the steps say how far it got
        assert measured(chosen.keep_player) == max(m for _, m in steps) == 0.3


def test_steering_stops_where_a_correction_asks_more_than_the_model_can_give():
    """Timings that say pruning barely helps drive the correction past what the model can
    remove: steering stops there and keeps the fastest allocation tried, it does not fail."""
    from onnxprune.api import steer_to_measured_latency
    from onnxprune.errors import TargetError

    def allocate_at(share):
        if share > 0.6:
            raise TargetError("cannot be reached")
        return _Alloc(share), None, 0

    (chosen, _, _), steps = steer_to_measured_latency(allocate_at, 0.4, lambda share: 0.2 * share)
    assert steps[0] == [0.4, 0.08] and chosen.keep_player == max(s for s, _ in steps) <= 0.6
    with pytest.raises(TargetError):  # the first try is the target itself: that error stands
        steer_to_measured_latency(allocate_at, 0.7, lambda share: share)


def test_a_model_that_got_slower_reads_as_a_signed_change():
    # the latency model can predict a slowdown at some width: "+12.0%", not "--12.0%"
    from onnxprune.report import Report

    report = Report()
    report.latency_target, report.macs_before, report.macs_after = 0.3, 100, 80
    report.fidelity_images, report.fidelity_relative_error = 10, 0.05
    report.latency_model = {"batch": 32, "before_ms": 1.0, "after_ms": 1.2, "reduction": -0.2, "layers_timed": 3,
                            "steps": [(0.3, -0.12)]}
    text = report.format_text()
    assert "(+20.0%)" in text and "-30.0% -> +12.0%" in text and "--2" not in text and "--1" not in text


def test_the_summary_says_a_gpu_latency_includes_the_copies():
    """On the CUDA provider the timed runs are fed NumPy arrays, so each copies its input to the
    GPU and its output back; at small sizes that is much of the time, and the summary says so."""
    from onnxprune.report import Report

    def summary(provider):
        report = Report(provider=provider)
        report.macs_before, report.macs_after = 100, 50
        report.fidelity_images, report.fidelity_relative_error = 10, 0.05
        report.latency = [{"batch": 1, "before_ms": 1.0, "after_ms": 0.9}, {"batch": 32, "before_ms": 4.0, "after_ms": 3.0}]
        return report.format_text()

    gpu = summary("CUDA GPU (onnxruntime CUDAExecutionProvider)")
    assert "sessions on CUDA GPU, interleaved; each run copies its input to the GPU and output back" in gpu
    for provider in ("CPU (onnxruntime CPUExecutionProvider)",
                     "CPU (onnxruntime CPUExecutionProvider; a GPU is present but onnxruntime's CUDA provider did not start)"):
        cpu = summary(provider)
        assert "sessions on CPU, interleaved\n" in cpu and "copies" not in cpu


def test_identical_layers_are_timed_once_and_priced_alike(monkeypatch):
    """Blocks of the same shape rebuild as the same single-layer model: one timing prices them
    all, so the allocation does not choose among them by timing noise."""
    import onnxprune.latency_model as latency_model
    from tiny import Builder

    b = Builder()
    x = b.relu(b.conv("input", 3, 8))
    for _ in range(4):  # four 3x3 convs of 8 -> 8 channels on the same map
        x = b.relu(b.conv(x, 8, 8))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)

    timed = []
    real = latency_model._seconds

    def counted(layer, feed, providers):
        timed.append(layer.SerializeToString())
        return real(layer, feed, providers)

    monkeypatch.setattr(latency_model, "_seconds", counted)
    prepared, analysis = analysis_of(b.model(b.gemm(x, 8, 10), ["N", 10]))
    providers, _ = choose_providers("cpu")
    sample = np.zeros(tuple(d.dim_value for d in prepared.graph.input[0].type.tensor_type.shape.dim[1:]), np.float32)
    model = LatencyModel(analysis, prepared, prepared.graph.input[0].name, sample, 2, providers, 4, 0.1,
                         default_opset(prepared))
    layer_timings = timed[:-1]  # the last timing is the whole model's
    assert len(layer_timings) == len(set(layer_timings))
    # the four 8 -> 8 convs (the stem reads 3 channels, the Gemm writes 10): one price for all
    middle = [entry for node, entry in zip(analysis.mac_nodes, model.layers)
              if node.op == "Conv" and node.inputs[1].values.shape == (8, 8, 3, 3)]
    assert len(middle) == 4
    assert len({entry[2] for entry in middle}) == 1


def test_latency_is_measured_between_models_of_different_input_widths():
    """``after_sample``: the model after takes another input shape (a chain whose input channels
    were cut, timed against the whole one); each model is fed its own sample."""
    from onnxprune import latency
    from tiny import Builder

    def chain(channels):
        b = Builder(channels=channels)
        return b.model(b.relu(b.conv("input", channels, 8)))

    whole, cut = chain(8), chain(4)
    sample = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(Exception):  # one sample for both cannot feed the narrower input
        latency.measure(whole, cut, "input", sample, [2], ["CPUExecutionProvider"])
    (timed,) = latency.measure(whole, cut, "input", sample, [2], ["CPUExecutionProvider"],
                               after_sample=np.zeros((4, 8, 8), np.float32))
    assert timed.batch == 2 and timed.before_ms > 0 and timed.after_ms > 0
