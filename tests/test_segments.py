"""Frontiers: the tensors at a cut, kept per image in memory within a shared budget and in
temporary files beyond it, read back unchanged."""

import os

import numpy as np
import onnxprune
import pytest

from onnxprune import segments
from onnxprune.segments import Frontier, MemoryBudget
from surgery import outputs


def _batches(seed, shape, count, batch=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch,) + shape).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("limit", [0, 200, 10 ** 9])
def test_frontier_reads_back_what_was_written_whatever_the_budget(tmp_path, limit):
    budget = MemoryBudget(limit)
    a, b = Frontier(str(tmp_path), budget), Frontier(str(tmp_path), budget)
    xs, ys = _batches(0, (3, 5), 6), _batches(1, (2,), 6)
    for i, (x, y) in enumerate(zip(xs, ys)):
        a.write("x", 4 * i, x)
        a.write("y", 4 * i, y)
        b.write("x", 4 * i, x + 1)
    assert budget.used <= limit
    for i, (x, y) in enumerate(zip(xs, ys)):
        np.testing.assert_array_equal(a.read("x", 4 * i, 4 * i + 4), x)
        np.testing.assert_array_equal(a.read("y", 4 * i, 4 * i + 4), y)
        np.testing.assert_array_equal(b.read("x", 4 * i, 4 * i + 4), x + 1)
    spilled = bool(a.files or b.files)
    assert spilled == (limit < 6 * (xs[0].nbytes * 2 + ys[0].nbytes))
    a.close()
    b.close()
    assert budget.used == 0 and os.listdir(tmp_path) == []


def test_a_frontier_past_the_budget_takes_no_more_memory(tmp_path):
    budget = MemoryBudget(3 * 4 * 10 * 4)  # three batches of (4, 10) float32
    f = Frontier(str(tmp_path), budget)
    for i, x in enumerate(_batches(2, (10,), 8)):
        f.write("t", 4 * i, x)
        assert budget.used <= budget.limit
    assert f.files and not f.batches and budget.used == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_spilled_tensors_hold_no_open_files(tmp_path):
    # the refit stores rows for every layer at once: a deep network's spill files must not
    # each keep a file open
    before = len(os.listdir("/proc/self/fd"))
    f = Frontier(str(tmp_path), MemoryBudget(0))
    for i in range(300):
        f.write(f"t{i}", 0, np.full((2, 3), i, dtype=np.float32))
    assert len(os.listdir("/proc/self/fd")) <= before + 1
    np.testing.assert_array_equal(f.read("t299", 0, 2), np.full((2, 3), 299, dtype=np.float32))
    f.close()
    assert os.listdir(tmp_path) == []


def test_refit_through_spilled_frontiers_equals_refit_in_memory(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = os.path.join(root, "models", "fmnist_resnet.onnx")
    calib = os.path.join(root, "models", "fmnist_resnet_calib")
    opts = onnxprune.PruneOptions(flops=0.5, max_images=64, latency=False)
    in_memory = onnxprune.prune(model, calib, opts).model
    monkeypatch.setattr(segments, "SPILL_BYTES", 0)  # every frontier goes to disk
    spilled = onnxprune.prune(model, calib, opts).model
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(outputs(spilled, x)[0], outputs(in_memory, x)[0])


def test_an_error_during_the_refit_leaves_no_spill_file_behind(monkeypatch):
    import tempfile

    import onnxprune.recover as recover

    real, calls = recover.run_feeds, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # mid-step, with frontiers being written
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    folders, mkdtemp = [], tempfile.mkdtemp

    def recorded(*args, **kwargs):
        folders.append(mkdtemp(*args, **kwargs))
        return folders[-1]

    monkeypatch.setattr(segments, "SPILL_BYTES", 0)
    monkeypatch.setattr(recover, "run_feeds", failing)
    monkeypatch.setattr(recover.tempfile, "mkdtemp", recorded)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the exception is kept (as a caller handling it would): its traceback holds the refit's frames
    with pytest.raises(Exception, match="simulated failure") as caught:
        onnxprune.prune(os.path.join(root, "models", "fmnist_resnet.onnx"), os.path.join(root, "models", "fmnist_resnet_calib"),
                        onnxprune.PruneOptions(flops=0.5, max_images=64, latency=False))
    assert caught.value is not None and folders and not any(os.path.exists(f) for f in folders)
