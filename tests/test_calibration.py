"""Calibration images that do not match the model: converted, resized, and said."""

import os
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image

import tiny
from onnxprune.cli import run
from onnxprune.data import input_spec, load_calibration
from onnxprune.options import PruneOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREY_MODEL = os.path.join(ROOT, "models", "mnist_cnn.onnx")  # (N, 1, 28, 28)


def _colour_model(path):
    onnx.save(tiny.plain_cnn(), path)  # (N, 3, 8, 8)
    return str(path)


def _images(folder, n, size, mode, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, mode).save(folder / f"{i:03d}.png")
    return str(folder)


def _prune(model, calib, tmp_path, capsys, *extra):
    out = tmp_path / "out.onnx"
    code = run([model, str(out), "--calib", calib, "--flops", "0.3", "--no-latency", *extra])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert out.exists()
    return text.out


def test_grey_images_for_a_colour_model_are_converted_and_said(tmp_path, capsys):
    model = _colour_model(tmp_path / "m.onnx")
    out = _prune(model, _images(tmp_path / "grey", 12, (8, 8), "L"), tmp_path, capsys)
    assert "note: converted 12 grey calibration images to RGB" in out


def test_colour_images_for_a_grey_model_are_converted_and_said(tmp_path, capsys):
    out = _prune(GREY_MODEL, _images(tmp_path / "rgb", 12, (28, 28), "RGB"), tmp_path, capsys)
    assert "note: converted 12 colour calibration images to grey" in out
    assert "enlarged" not in out


def test_images_smaller_than_the_input_are_enlarged_and_said(tmp_path, capsys):
    out = _prune(GREY_MODEL, _images(tmp_path / "small", 10, (10, 12), "L"), tmp_path, capsys)
    assert "note: enlarged 10 calibration images smaller than the input 28x28" in out
    assert "converted" not in out


def test_transparency_is_dropped_and_said(tmp_path, capsys):
    model = _colour_model(tmp_path / "m.onnx")
    out = _prune(model, _images(tmp_path / "rgba", 6, (8, 8), "RGBA"), tmp_path, capsys)
    assert "note: dropped the transparency of 6 calibration images" in out


def test_conversions_give_the_expected_tensors(tmp_path):
    """A grey image fed to a colour model is that image in all three channels; a colour image
    fed to a grey model is its luminance; a small image is enlarged to the input size."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey, "L").save(folder / "a.png")
    model = tiny.plain_cnn()
    cal = load_calibration(str(folder), input_spec(model, PruneOptions()), PruneOptions())
    x = next(cal.batches([0]))
    assert x.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(x[0], np.stack([grey / 255.0] * 3), atol=1e-6)

    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(folder / "a.png")
    cal = load_calibration(str(folder), input_spec(onnx.load(GREY_MODEL), PruneOptions()), PruneOptions())
    x = next(cal.batches([0]))
    luminance = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), np.float32) / 255
    np.testing.assert_allclose(x[0, 0], luminance, atol=1e-6)

    Image.fromarray(grey[:4, :6], "L").save(folder / "a.png")
    cal = load_calibration(str(folder), input_spec(onnx.load(GREY_MODEL), PruneOptions()), PruneOptions())
    assert cal.notes == ["enlarged 1 calibration image smaller than the input 28x28 (resized up, then centre-cropped)"]
    assert next(cal.batches([0])).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("count", [1, 3])
def test_a_single_image_or_fewer_than_a_batch(tmp_path, capsys, count):
    calib = os.path.join(ROOT, "models", "mnist_cnn_calib")
    sub = tmp_path / "few"
    sub.mkdir()
    for f in sorted(os.listdir(calib))[:count]:
        shutil.copy(os.path.join(calib, f), sub / f)
    out = _prune(GREY_MODEL, str(sub), tmp_path, capsys, "--batch-size", "32")
    assert f"fidelity on {count} calibration images (none held out: the ones pruning used)" in out


def test_a_large_npy_is_read_only_where_max_images_samples_are_taken(tmp_path):
    """The samples used are spread evenly over the file and only they are read: a NaN in a row
    not used is never seen, and the batches are those of the same rows given as an array."""
    from onnxprune.data import spread
    x = np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)
    used = spread(40, 24)
    assert used[0] == 0 and used[-1] >= 36 and len(set(used.tolist())) == 24  # first to last, no repeats
    unused = np.setdiff1d(np.arange(40), used)
    x[unused] = np.nan
    np.save(tmp_path / "x.npy", x)
    spec = input_spec(onnx.load(GREY_MODEL), PruneOptions(flops=0.5))
    opts = PruneOptions(flops=0.5, max_images=24)
    from_file = load_calibration(str(tmp_path / "x.npy"), spec, opts)
    from_array = load_calibration(x[used].copy(), spec, opts)
    assert len(from_file) == 24 and isinstance(from_file.array, np.memmap)  # mapped, not read
    for a, b in zip(from_file.batches(from_file.fit), from_array.batches(from_array.fit)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="NaN or infinite"):
        load_calibration(str(tmp_path / "x.npy"), spec, PruneOptions(flops=0.5, max_images=40))


def _class_folders(root, classes: int, per_class: int, prefix: str) -> None:
    """One subfolder per class of small grey PNGs, each image a different shade."""
    for c in range(classes):
        (root / f"{prefix}{c}").mkdir()
        for i in range(per_class):
            Image.fromarray(np.full((28, 28), 20 * c + i, np.uint8)).save(root / f"{prefix}{c}" / f"{i}.png")


def test_max_images_spreads_over_a_folder_sorted_by_class(tmp_path):
    _class_folders(tmp_path, 4, 5, "class")
    spec = input_spec(onnx.load(GREY_MODEL), PruneOptions(flops=0.5))
    cal = load_calibration(str(tmp_path), spec, PruneOptions(flops=0.5, max_images=8))
    assert len(cal) == 8
    assert sorted({os.path.basename(os.path.dirname(f)) for f in cal.files}) == [f"class{c}" for c in range(4)]


def test_sixteen_bit_pngs_keep_their_range(tmp_path):
    # PIL's own 8-bit conversion clips everything above 255: a 16-bit white must stay white
    levels = np.array([[0, 257 * 100, 65535]], np.uint16).repeat(28, 0)[:, :28].repeat(10, 1)[:, :28]
    Image.fromarray(levels).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode in ("I;16", "I")
    spec = input_spec(onnx.load(GREY_MODEL), PruneOptions(flops=0.5))
    cal = load_calibration(str(tmp_path), spec, PruneOptions(flops=0.5, holdout=0.0))
    x = next(cal.batches(cal.fit))[0, 0]
    np.testing.assert_allclose(x, levels / 65535.0, atol=1e-5)
    assert any("16-bit" in n for n in cal.notes)


def test_labels_number_every_class_folder_whatever_max_images_picks(tmp_path):
    _class_folders(tmp_path, 10, 5, "c")
    spec = input_spec(onnx.load(GREY_MODEL), PruneOptions(flops=0.5))
    cal = load_calibration(str(tmp_path), spec, PruneOptions(flops=0.5, max_images=4, labels=True, payoff="output"))
    folders = [int(os.path.basename(os.path.dirname(f))[1:]) for f in cal.files]
    assert folders != [0, 1, 2, 3] and list(cal.labels) == folders  # the folder's own class id


@pytest.mark.parametrize("fixed_batch,opset,diagonal", [(False, 13, False), (True, 13, False), (False, 11, False),
                                                     (False, 18, False), (True, 13, True), (False, 11, True)])
def test_statistics_reduced_inside_onnxruntime_match_numpys(monkeypatch, fixed_batch, opset, diagonal):
    """The same images through both paths: every pixel is sampled at this size, so sums,
    means, |x| and second moments agree; a fixed batch pads its last batch, which the mask drops."""
    import onnxprune.calibrate as calibrate
    from onnxprune.consumers import find_consumers
    from surgery import analysis_of

    if diagonal:  # only the variances of wide layers: here every layer is "wide"
        monkeypatch.setattr(calibrate, "FULL_GRAM_LIMIT", 4)
    model = tiny.residual_cnn(opset=opset)  # the reductions' axes: attributes before 13 (18 for ReduceL1)
    if fixed_batch:
        for vi in list(model.graph.input) + list(model.graph.output):
            vi.type.tensor_type.shape.dim[0].dim_value = 8
    prepared, analysis = analysis_of(model)
    wanted = {c.tensor: c.repeat for c in find_consumers(analysis)}
    x = np.random.default_rng(2).normal(size=(29, 3, 8, 8)).astype(np.float32)  # 23 fit: a partial batch
    opts = PruneOptions(flops=0.5, batch_size=8)
    cal = load_calibration(x, input_spec(model, opts), opts)
    results = []
    for work in (2 ** 62, 0):  # all in NumPy, then all in the graph
        monkeypatch.setattr(calibrate, "REDUCE_IN_GRAPH_WORK", work)
        results.append(calibrate.collect_stats(prepared, wanted, cal, cal.fit, ["CPUExecutionProvider"],
                                               absolute=True))
    numpy_stats, graph_stats = results
    from onnxprune.shapes import static_shapes
    types = {}
    graph = calibrate._StatsGraph(prepared, wanted, static_shapes(prepared, {"input": (8, 3, 8, 8)}, types), types,
                                  8, True, fixed_batch)
    assert len(graph.plan) == len(wanted) and not graph.raw  # every tensor really was reduced in the graph
    for name in wanted:
        a, b = numpy_stats[name], graph_stats[name]
        assert a.count == b.count and a.gram_count == b.gram_count
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b.mean_abs, a.mean_abs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b.second_moment(), a.second_moment(), rtol=1e-4, atol=1e-6)


def test_sampled_statistics_inside_onnxruntime_keep_exact_means(monkeypatch):
    import onnxprune.calibrate as calibrate
    monkeypatch.setattr(calibrate, "GRAM_MIN_SAMPLES", 64)  # force sampling of a 28x28 map
    monkeypatch.setattr(calibrate, "GRAM_SAMPLES_PER_CHANNEL", 32)  # 1024 of the 15680 pixels, 512 a batch
    model = onnx.load(GREY_MODEL)
    x = np.random.default_rng(3).random((20, 1, 28, 28), dtype=np.float32)
    opts = PruneOptions(flops=0.5, batch_size=10, holdout=0.0)
    cal = load_calibration(x, input_spec(model, opts), opts)
    from onnxprune.prepare import prepare
    prepared, _ = prepare(model)
    first = next(n for n in prepared.graph.node if n.op_type == "Conv")
    monkeypatch.setattr(calibrate, "REDUCE_IN_GRAPH_WORK", 0)
    s = calibrate.collect_stats(prepared, {first.output[0]: 1}, cal, cal.fit, ["CPUExecutionProvider"])[first.output[0]]
    out = onnxruntime_output(prepared, first.output[0], x)
    np.testing.assert_allclose(s.mean, out.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)  # every pixel
    assert 0 < s.gram_count < out.shape[0] * out.shape[2] * out.shape[3]  # the Gram saw a sample
    cov = np.cov(out.transpose(1, 0, 2, 3).reshape(out.shape[1], -1))
    # about a thousand samples: within a tenth of the largest entry
    np.testing.assert_allclose(s.covariance(), cov, rtol=0, atol=0.1 * np.abs(cov).max())


@pytest.mark.parametrize("in_graph", [False, True])
def test_second_moments_take_the_same_share_of_samples_whatever_the_batch_size(monkeypatch, in_graph):
    """The Gram's sample is a budget over the whole calibration, spread over its batches: smaller
    batches do not buy more samples (and cost), nor larger ones fewer."""
    import onnxprune.calibrate as calibrate
    monkeypatch.setattr(calibrate, "GRAM_MIN_SAMPLES", 64)
    monkeypatch.setattr(calibrate, "GRAM_SAMPLES_PER_CHANNEL", 32)  # 1024 of the 39200 pixels of 50 images
    monkeypatch.setattr(calibrate, "REDUCE_IN_GRAPH_WORK", 0 if in_graph else 2 ** 62)
    model = onnx.load(GREY_MODEL)
    x = np.random.default_rng(4).random((50, 1, 28, 28), dtype=np.float32)
    from onnxprune.prepare import prepare
    prepared, _ = prepare(model)
    first = next(n for n in prepared.graph.node if n.op_type == "Conv")
    channels = onnxruntime_output(prepared, first.output[0], x[:1]).shape[1]
    counts = []
    for batch in (5, 10, 25):
        opts = PruneOptions(flops=0.5, batch_size=batch, holdout=0.0)
        cal = load_calibration(x, input_spec(model, opts), opts)
        s = calibrate.collect_stats(prepared, {first.output[0]: 1}, cal, cal.fit, ["CPUExecutionProvider"])
        counts.append(s[first.output[0]].gram_count)
    budget = 32 * channels
    # each batch rounds its share up (in the graph: to whole positions per image)
    assert all(budget <= c <= budget + 50 * 28 for c in counts), (budget, counts)


def onnxruntime_output(model, name, x):
    import onnxruntime as ort
    from onnxprune.runtime import expose
    sess = ort.InferenceSession(expose(model, [name]).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], {model.graph.input[0].name: x})[0]


def test_graph_statistics_only_where_axis_0_is_the_batch_and_positions_are_drawn_per_batch(monkeypatch):
    import onnxprune.calibrate as calibrate
    from onnxprune.shapes import static_shapes
    monkeypatch.setattr(calibrate, "REDUCE_IN_GRAPH_WORK", 0)
    monkeypatch.setattr(calibrate, "GRAM_MIN_SAMPLES", 64)
    monkeypatch.setattr(calibrate, "GRAM_SAMPLES_PER_CHANNEL", 2)  # 16 of each image's 64 positions
    model = tiny.residual_cnn()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    types = {}
    shapes = static_shapes(model, {"input": (4, 3, 8, 8)}, types)
    wrong = dict(shapes, **{conv.output[0]: (4 * 64, 8)})  # as a MatMul input reshaped to (N x H x W, C)
    assert calibrate._StatsGraph(model, {conv.output[0]: 1}, wrong, types, 4, False, False).raw == [conv.output[0]]
    assert calibrate._StatsGraph(model, {conv.output[0]: 1}, shapes, types, 4, False, False, in_graph=False).raw  # a GPU
    graph = calibrate._StatsGraph(model, {conv.output[0]: 1}, shapes, types, 4, False, False)
    assert not graph.raw
    (entry,) = graph.plan
    index, k, pixels = entry.index, entry.k, entry.pixels
    drawn = [graph.feeds(b, 4, 4)[index] for b in range(3)]
    for at in drawn:
        assert len(at) == k < pixels and len(set(at.tolist())) == k and 0 <= at.min() and at.max() < pixels
    assert not np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[1], drawn[2])
    assert len({p % 8 for at in drawn for p in at.tolist()}) == 8  # every column of the 8x8 map seen


def test_no_tensors_no_statistics():
    import onnxprune.calibrate as calibrate
    model = onnx.load(GREY_MODEL)
    opts = PruneOptions(flops=0.5)
    cal = load_calibration(np.zeros((4, 1, 28, 28), np.float32), input_spec(model, opts), opts)
    assert calibrate.collect_stats(model, {}, cal, cal.fit, ["CPUExecutionProvider"]).tensors == {}


def test_statistics_of_a_tensor_that_folds_the_batch_with_the_pixels():
    # conv -> Transpose -> Reshape (N x H x W, C) -> MatMul, as TF exports write a 1x1 conv:
    # every row of every real image counts, none of the padding
    import onnxprune.calibrate as calibrate
    b = tiny.Builder(channels=1)
    x = b.relu(b.conv("input", 1, 6))
    b.inits.append(onnx.numpy_helper.from_array(np.array([-1, 6], np.int64), "rows_shape"))
    rows = b.node("Reshape", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), "rows_shape"])
    out = b.node("MatMul", [rows, b.init(np.ones((6, 2), np.float32), "w")])
    model = b.model(out, [None, 2])
    x_all = np.random.default_rng(4).random((10, 1, 8, 8), dtype=np.float32)
    for fixed in (False, True):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4 if fixed else 0
        if not fixed:
            m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        opts = PruneOptions(flops=0.5, batch_size=4, holdout=0.0)
        cal = load_calibration(x_all, input_spec(m, opts), opts)  # 10 images: a last batch of 2
        s = calibrate.collect_stats(m, {rows: 1}, cal, cal.fit, ["CPUExecutionProvider"])[rows]
        reference = onnxruntime_output(m, rows, x_all) if not fixed else None
        assert s.count == 10 * 64
        if reference is not None:
            np.testing.assert_allclose(s.mean, reference.mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("budget_images", [0, 3, 100])
def test_decoded_images_are_kept_within_their_budget_and_give_the_same_tensors(tmp_path, monkeypatch, budget_images):
    """The conversion reads the fitting images more than once. Each image's decoded pixels are
    kept up to DECODED_CACHE_BYTES, past which it is decoded again: the tensors are the same
    either way, on every pass, and a pass over kept images opens no file."""
    import onnxprune.data as data

    folder = _images(tmp_path / "imgs", 10, (20, 14), "RGB")
    opts = PruneOptions(bgr=True, scale=1 / 255, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    spec = input_spec(tiny.plain_cnn(), opts)
    monkeypatch.setattr(data, "DECODED_CACHE_BYTES", 0)
    uncached = load_calibration(folder, spec, opts)
    everything = np.arange(len(uncached))
    expected = np.concatenate(list(uncached.batches(everything)))
    assert uncached.decoded_bytes == 0

    monkeypatch.setattr(data, "DECODED_CACHE_BYTES", budget_images * 8 * 8 * 3)  # uint8 8x8 RGB crops
    cal = load_calibration(folder, spec, opts)
    first = np.concatenate(list(cal.batches(everything)))
    assert len(cal.decoded) == min(budget_images, 10)
    assert cal.decoded_bytes <= data.DECODED_CACHE_BYTES
    if budget_images >= 10:
        monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("a kept image was decoded again"))
    second = np.concatenate(list(cal.batches(everything[::-1])))[::-1]
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)


def test_an_overflow_in_the_last_batch_is_reported(tmp_path):
    """A batch's statistics are taken while onnxruntime runs the next one: an infinity that only
    the last batch makes must still stop the conversion with the one-line error, not be lost
    with the background work."""
    import onnxprune
    from onnxprune.errors import InputError
    x = np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)
    x[32:] = 3e38  # the last batch of 8: its first conv's sums overflow to infinity
    with pytest.raises(InputError, match="NaN or infinite values"):
        onnxprune.prune(GREY_MODEL, x, PruneOptions(flops=0.3, batch_size=8, holdout=0.0, latency=False))
    x[32:] = 0.5  # the same images without the overflow prune fine
    assert onnxprune.prune(GREY_MODEL, x, PruneOptions(flops=0.3, batch_size=8, holdout=0.0,
                                                       latency=False)).report.flops_reduction >= 0.3
