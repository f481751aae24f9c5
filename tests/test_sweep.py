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
    # the convolution MACs onnxruntime's CPU kernels no longer run, beside the counted FLOPs
    assert all(0 < r["kernels_reduction"] < 1 for r in rows) and rows[0]["kernels_reduction"] < rows[1]["kernels_reduction"]
    table = (out / "sweep.md").read_text()
    assert "| 0.3 |" in table and "| 0.6 |" in table
    assert "| target | FLOPs removed | conv MACs run removed | params removed |" in table
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


def test_sweep_calibrates_once_and_makes_what_prune_makes_at_each_target(tmp_path, monkeypatch):
    """A sweep loads, calibrates and scores once for all its targets; each model is still
    exactly the one a separate conversion makes, and a target that cannot be met takes
    nothing from the ones after it."""
    import numpy as np

    import onnxprune
    import onnxprune.api as api
    from onnxprune.errors import TargetError

    opts = onnxprune.PruneOptions(max_images=64, latency=False)
    calibrations = []
    real_collect = api.collect_stats
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: calibrations.append(1) or real_collect(*a, **k))
    got = {}

    def keep(target, result):
        if isinstance(result, TargetError):
            got[target] = result
            return
        path = str(tmp_path / f"R{target}.onnx")
        result.save(path)  # in the call: the next target releases this one's weights
        got[target] = (onnx.load(path), result.report)

    api.prune_each(BASE + ".onnx", BASE + "_calib", [0.3, 0.99, 0.6], keep, opts)
    assert len(calibrations) == 1
    assert isinstance(got[0.99], TargetError) and "cannot" in str(got[0.99])
    for target in (0.3, 0.6):
        swept, report = got[target]
        alone = onnxprune.prune(BASE + ".onnx", BASE + "_calib", opts.replace(flops=target))
        assert report.flops_reduction == alone.report.flops_reduction
        assert report.fidelity_relative_error == alone.report.fidelity_relative_error
        mine = {t.name: onnx.numpy_helper.to_array(t) for t in swept.graph.initializer}
        theirs = {t.name: onnx.numpy_helper.to_array(t) for t in alone.model.graph.initializer}
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])
    assert api.SHARED_NOTE in got[0.6][1].notes and "calibrate" not in got[0.6][1].seconds
    assert "calibrate" in got[0.3][1].seconds


@pytest.mark.parametrize("targets, changes, message", [
    ([0.3, 1.2], {}, "--flops"),
    ([], {}, "at least one FLOPs target"),
    ([0.3], {"latency_target": 0.3}, "does not combine with a latency target"),
])
def test_prune_each_refuses_bad_targets_before_any_work(targets, changes, message, monkeypatch):
    import onnxprune
    import onnxprune.api as api
    from onnxprune.errors import UsageError

    monkeypatch.setattr(api, "load_model", lambda *a: pytest.fail("loaded before the targets were checked"))
    with pytest.raises(UsageError, match=message):
        onnxprune.prune_each(BASE + ".onnx", BASE + "_calib", targets, lambda t, r: None,
                             onnxprune.PruneOptions(**changes))
