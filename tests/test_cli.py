"""End-to-end runs of the command line on the real models shipped in models/."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.cli import run
from onnxprune.flops import count_macs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "models", "*.onnx")))


def _paths(name):
    base = os.path.join(ROOT, "models", name)
    return base + ".onnx", base + "_calib", base + "_test.npz"


def _signature(model):
    return [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]) for o in model.graph.output]


def test_models_are_shipped():
    assert len(MODELS) >= 2


@pytest.mark.parametrize("ratio", [0.4, 0.6])
@pytest.mark.parametrize("name", MODELS)
def test_prunes_real_model_to_target(name, ratio, tmp_path, capsys):
    model_path, calib, test_npz = _paths(name)
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code = run([model_path, str(out), "--calib", calib, "--flops", str(ratio), "--max-images", "64",
                "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    original, pruned = onnx.load(model_path), onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    shape = {"input": (1, 1, 28, 28)}
    achieved = 1 - count_macs(pruned, shape) / count_macs(original, shape)
    assert abs(achieved - ratio) <= 0.01
    assert _signature(pruned) == _signature(original)
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    x = np.load(test_npz)["x"][:5]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": x})
    assert y.shape == (5, 10) and np.isfinite(y).all()
    data = json.loads(report.read_text())
    assert abs(data["flops_reduction"] - achieved) < 1e-9
    # wall time and peak memory: the whole conversion spans its stages; onnxruntime alone holds >10 MB
    assert data["wall_seconds"] >= sum(v for k, v in data["seconds"].items() if not k.startswith("latency_"))
    if sys.platform != "win32":
        assert data["peak_rss_bytes"] > 10 * 2 ** 20
    text = capsys.readouterr().out
    assert "FLOPs" in text and "fidelity" in text and "conversion " in text


def test_eval_reports_accuracy_before_and_after(tmp_path, capsys):
    model_path, calib, test_npz = _paths(MODELS[0])
    code = run([model_path, str(tmp_path / "o.onnx"), "--calib", calib, "--flops", "0.3", "--max-images", "32",
                "--eval", test_npz])
    assert code == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("accuracy"))
    before = float(line.split()[1].rstrip("%"))
    assert before > 80.0  # the shipped models are trained


def test_npy_calibration_equals_image_folder(tmp_path, capsys):
    """Preprocessed tensors and the same images as files give the same pruned model."""
    model_path, calib, _ = _paths(MODELS[0])
    from PIL import Image
    files = sorted(os.listdir(calib))[:40]
    x = np.stack([np.asarray(Image.open(os.path.join(calib, f)), np.float32)[None] * np.float32(1 / 255) for f in files])
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    sub = tmp_path / "imgs"
    sub.mkdir()
    for f in files:
        os.link(os.path.join(calib, f), sub / f)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run([model_path, str(a), "--calib", str(tmp_path / "x.npy"), "--flops", "0.5", "--criterion", "activation"]) == 0
    assert run([model_path, str(b), "--calib", str(sub), "--flops", "0.5", "--criterion", "activation"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_installed_command_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "onnxprune")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--flops" in result.stdout and "ImageNet" in result.stdout


def test_analyze_lists_groups_and_blocked_reasons(capsys):
    model_path, _, _ = _paths("fmnist_resnet")
    assert run([model_path, "--analyze"]) == 0
    out = capsys.readouterr().out
    assert "100.0% in layers that prunable groups enter or leave" in out
    assert "(+2 coupled)" in out  # residual streams are one group
    assert "reaches a graph output" in out


def test_analyze_shows_why_a_group_is_blocked(tmp_path, capsys):
    import tiny
    b = tiny.Builder()
    x = b.relu(b.conv("input", 3, 8))
    model = b.model(b.conv(b.node("Softmax", [x], axis=1), 8, 4))
    onnx.save(model, tmp_path / "m.onnx")
    assert run([str(tmp_path / "m.onnx"), "--analyze"]) == 0
    out = capsys.readouterr().out
    assert "Softmax" in out and "mixes channels" in out


def test_report_carries_measured_latency(tmp_path, capsys):
    model_path, calib, _ = _paths(MODELS[0])
    report = tmp_path / "r.json"
    assert run([model_path, str(tmp_path / "o.onnx"), "--calib", calib, "--flops", "0.5", "--max-images", "32",
                "--latency-batch", "8", "--report", str(report)]) == 0
    lat = json.loads(report.read_text())["latency"]
    assert [l["batch"] for l in lat] == [1, 8] and all(l["before_ms"] > 0 and l["after_ms"] > 0 for l in lat)
    assert "latency, batch 8" in capsys.readouterr().out
    assert run([model_path, str(tmp_path / "o.onnx"), "--calib", calib, "--flops", "0.5", "--max-images", "32",
                "--no-latency", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["latency"] == []


def test_fidelity_is_measured_before_a_final_softmax():
    import tiny
    import onnxprune

    def net(softmax):
        b = tiny.Builder(seed=2)
        x = b.relu(b.conv("input", 3, 16))
        x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        y = b.gemm(x, 16, 10)
        return b.model(b.node("Softmax", [y], axis=1) if softmax else y, ["N", 10])

    x = np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32)
    opts = onnxprune.PruneOptions(flops=0.4, round_to=1, latency=False)
    plain = onnxprune.prune(net(False), x, opts).report
    soft = onnxprune.prune(net(True), x, opts).report
    assert plain.fidelity_relative_error > 0
    assert abs(soft.fidelity_relative_error - plain.fidelity_relative_error) < 1e-6
