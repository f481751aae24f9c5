"""Frontiers: the tensors at a cut, kept per image in memory within a shared budget and in
temporary files beyond it, read back unchanged."""

import os

import numpy as np
import onnx
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


@pytest.mark.parametrize("limit", [0, 10 ** 9])
def test_frontier_keeps_pixel_rows_and_whole_tensors(tmp_path, limit):
    # an (N x 6, 3) matrix has 6 rows per image; a shape tensor is the batch's as a whole
    frontier = Frontier(str(tmp_path), MemoryBudget(limit))
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=(n * 6, 3)).astype(np.float32) for n in (4, 4, 2)]
    shapes = [np.array([n, 3, 2, 3], np.int64) for n in (4, 4, 2)]
    for i, (r, s) in enumerate(zip(rows, shapes)):
        frontier.write("rows", 4 * i, r, 6)
        frontier.write("shape", 4 * i, s, 0)
    for i, (r, s) in enumerate(zip(rows, shapes)):
        assert np.array_equal(frontier.read("rows", 4 * i, 4 * i + len(r) // 6), r)
        assert np.array_equal(frontier.read("shape", 4 * i, 4 * i + len(r) // 6), s)
    frontier.close()


def _pixel_rows_model():
    """A 1x1 conv as TF writes it, Transpose -> Reshape(-1, C) -> MatMul on (N x H x W, C) rows,
    between convs: the refit cuts before the MatMul and the conv after it."""
    from tiny import Builder

    b = Builder(channels=1, size=8)
    x = b.relu(b.conv("input", 1, 8))
    x = b.relu(b.conv(x, 8, 6))
    rows = b.node("Reshape", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), b.ints([-1, 6], "rows_shape")])
    y = b.node("MatMul", [rows, b.init(b.rng.normal(0, 0.4, (6, 6)))])
    y = b.node("Transpose", [b.node("Reshape", [y, b.ints([-1, 8, 8, 6], "back")])], perm=[0, 3, 1, 2])
    y = b.relu(b.conv(y, 6, 8))
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    return b.model(b.gemm(y, 8, 5), ["N", 5])


def _shape_crossing_model(batch):
    """A Shape tensor made early and read late (a reshape_as), crossing the refit's cuts."""
    from tiny import Builder

    b = Builder(channels=3, size=8, batch=batch)
    x = b.relu(b.conv("input", 3, 8))
    r2 = b.relu(b.conv(x, 8, 8))
    s = b.node("Shape", [r2])
    r3 = b.relu(b.conv(r2, 8, 8))
    r4 = b.node("Reshape", [b.node("Flatten", [r3], axis=1), s])
    y = b.relu(b.conv(r4, 8, 8))
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    return b.model(b.gemm(y, 8, 5), [batch, 5])


@pytest.mark.parametrize("case", ["pixel_rows", "shape_dynamic", "shape_fixed_batch", "shape_spilled"])
def test_refit_cuts_where_axis_0_is_not_one_row_per_image(case, monkeypatch):
    # 34 images in batches of 16: the last batch has 2, fewer than the shape tensor's 4 entries
    if case == "shape_spilled":
        monkeypatch.setattr(segments, "SPILL_BYTES", 0)
    model = _pixel_rows_model() if case == "pixel_rows" else _shape_crossing_model(16 if case == "shape_fixed_batch" else "N")
    xs = np.random.default_rng(0).random((34,) + (1 if case == "pixel_rows" else 3, 8, 8), dtype=np.float32)
    opts = onnxprune.PruneOptions(flops=0.3, batch_size=16, holdout=0.0, latency=False)
    result = onnxprune.prune(model, xs, opts)
    assert result.report.refitted_layers >= 3
    ref, out = outputs(model, xs[:16])[0], outputs(result.model, xs[:16])[0]
    assert np.linalg.norm(out - ref) < 0.05 * np.linalg.norm(ref)


def _fidelity_against_a_changed_copy(model, op, value, xs):
    """The fidelity of a copy of ``model`` whose last node's output goes through ``op`` with the
    constant ``value``, on half of ``xs`` held out."""
    from onnx import helper, numpy_helper

    from onnxprune.data import input_spec, load_calibration
    from onnxprune.verify import fidelity

    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.initializer.append(numpy_helper.from_array(value, "changed"))
    out = other.graph.node[-1].output[0]
    other.graph.node[-1].output[0] = "before_change"
    other.graph.node.append(helper.make_node(op, ["before_change", "changed"], [out], name="change"))
    opts = onnxprune.PruneOptions(flops=0.5, batch_size=16, holdout=0.5)
    cal = load_calibration(xs, input_spec(model, opts), opts)
    (fid,) = fidelity(model, [other], cal, ["CPUExecutionProvider"])
    return fid.relative_error


def test_fidelity_compares_every_row_of_an_output_that_folds_pixels_into_axis_0():
    # a candidate off by 1 on all but the first 16 rows of an (N x 64, 6) output: the rows
    # of the first images only would have read as a perfect match
    from tiny import Builder

    b = Builder(channels=1, size=8)
    x = b.relu(b.conv("input", 1, 6))
    rows = b.node("Reshape", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), b.ints([-1, 6], "rows_shape")])
    model = b.model(b.node("MatMul", [rows, b.init(b.rng.normal(0, 0.4, (6, 6)))]), [None, 6])
    delta = np.concatenate([np.zeros((16, 6)), np.ones((16 * 64 - 16, 6))]).astype(np.float32)
    xs = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    assert _fidelity_against_a_changed_copy(model, "Add", delta, xs) > 1.0


def test_fidelity_weighs_each_output_by_its_own_size():
    # logits beside a large feature map: a head off by 20% must not read as a 0.4% error
    from onnx import helper

    from tiny import Builder

    b = Builder(channels=3, size=8)
    feat = b.relu(b.conv("input", 3, 32))
    logits = b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [feat])], axis=1), 32, 5)
    model = b.model(logits, ["N", 5])
    model.graph.output.append(helper.make_tensor_value_info(feat, 1, ["N", 32, 8, 8]))
    xs = np.random.default_rng(0).random((32, 3, 8, 8), dtype=np.float32)
    error = _fidelity_against_a_changed_copy(model, "Mul", np.float32(1.2), xs)
    np.testing.assert_allclose(error, 0.2 / np.sqrt(2), rtol=1e-3)
