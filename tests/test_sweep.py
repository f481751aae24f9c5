"""--sweep: one model per target, a table, JSON and a plot of accuracy, latency and FLOPs."""

import json
import os

import onnx
import pytest

from onnxprune.cli import run
from onnxprune.flops import count_macs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "models", "mnist_cnn")


def test_sweep_writes_a_model_per_target_a_table_and_a_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = run([BASE + ".onnx", str(out), "--calib", BASE + "_calib", "--sweep", "0.6,0.3", "--max-images", "64",
                "--latency-batch", "4", "--eval", BASE + "_test.npz"])
    assert code == 0
    shapes = {"input": (1, 1, 28, 28)}
    before = count_macs(onnx.load(BASE + ".onnx"), shapes)
    for target in (0.3, 0.6):
        model = onnx.load(str(out / f"mnist_cnn-R{target:g}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert target <= 1 - count_macs(model, shapes) / before <= target + 0.01
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["target"] for r in rows] == [0.3, 0.6]
    assert all(r["accuracy_after"] > 0.95 and len(r["latency"]) == 2 for r in rows)
    table = (out / "sweep.md").read_text()
    assert "| 0.3 |" in table and "| 0.6 |" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'onnxprune[plot]'" in capsys.readouterr().out
    else:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--sweep", "0.3", "--flops", "0.4"], "either --flops or --sweep"),
    (["--sweep", "0.3,1.2"], "--sweep takes comma-separated FLOPs targets"),
    (["--sweep", "a,b"], "--sweep takes comma-separated FLOPs targets"),
])
def test_sweep_usage_errors(args, message, tmp_path, capsys):
    code = run([BASE + ".onnx", str(tmp_path / "s"), "--calib", BASE + "_calib"] + args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
