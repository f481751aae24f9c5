"""Recovery: the refit makes the pruned model follow the original."""

import numpy as np
import onnx
import onnxprune
import pytest

from onnxprune.refit import ChannelFit, PatchFit, im2col
from surgery import outputs, rel_error
from tiny import Builder


def _redundant_model():
    """conv (3->8) whose filter 7 is a copy of filter 0 and filter 6 twice filter 1, then
    a 3x3 conv, GAP and Gemm. Removing 6 and 7 loses no information (no ReLU between)."""
    b = Builder(seed=4)
    x = b.conv("input", 3, 8)
    w = onnx.numpy_helper.to_array(b.inits[0]).copy()
    bias = onnx.numpy_helper.to_array(b.inits[1]).copy()
    w[7], bias[7] = w[0], bias[0]
    w[6], bias[6] = 2 * w[1], 2 * bias[1]
    b.inits[0] = onnx.numpy_helper.from_array(w, b.inits[0].name)
    b.inits[1] = onnx.numpy_helper.from_array(bias, b.inits[1].name)
    x = b.relu(b.conv(x, 8, 8))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.model(b.gemm(x, 8, 5), ["N", 5])


def test_refit_restores_channels_that_are_combinations_of_kept_ones():
    from onnxprune.data import input_spec, load_calibration
    from onnxprune.recover import refit_sequential
    from onnxprune.rewrite import rewrite
    from surgery import analysis_of

    model = _redundant_model()
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    opts = onnxprune.PruneOptions(flops=0.5)
    cal = load_calibration(x, input_spec(model, opts), opts)
    prepared, analysis = analysis_of(model)
    group = next(g for g in analysis.groups if g.prunable and len(g.players) == 8 and "Conv" in g.name)
    keep = np.ones(analysis.num_players, dtype=bool)
    players = np.flatnonzero(analysis.player_group == group.index)
    keep[players[[6, 7]]] = False
    keep_fn = analysis.keep_fn(keep)
    pruned, changed = rewrite(analysis, keep, prepared)
    before = rel_error(outputs(model, x), outputs(pruned, x))
    log = refit_sequential(prepared, pruned, keep_fn, lambda name: 1, changed, cal, cal.fit, ["CPUExecutionProvider"],
                           ridge=1e-9)
    assert log.patch and not log.failed
    onnx.checker.check_model(pruned, full_check=True)
    after = rel_error(outputs(model, x), outputs(pruned, x))
    assert before > 0.05 and after < 1e-3


def test_patch_fit_is_exact_least_squares():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3))
    b = rng.normal(size=4)
    x = rng.normal(size=(16, 3, 6, 6))
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1]}
    y = (im2col(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]) @ w.reshape(4, -1).T + b).reshape(16, 6, 6, 4)
    fit = PatchFit(w.shape[2:], attrs, np.ones(3, dtype=bool), np.ones(4, dtype=bool), rows_per_image=36)
    fit.add(*fit.targets(y.transpose(0, 3, 1, 2)), x)  # the original layer's output from the same input: it must come back
    w2, b2 = fit.solve(ridge=1e-9)
    # each batch's products are taken in float32 (refit.PatchFit.add): the weights come back to
    # float32 rounding, which differs between BLAS kernels (1.4e-6 off on one AVX-512 machine)
    np.testing.assert_allclose(w2, w, atol=1e-5)
    np.testing.assert_allclose(b2, b, atol=1e-5)


def test_patch_fit_reads_kept_outputs_at_the_sampled_positions():
    """Sampled rows (fewer than the positions), outputs pruned, an input channel the layer
    never used removed, stride 2: the kept part of the original layer comes back exactly."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3, 3, 3))
    w[:, 1] = 0.0
    b = rng.normal(size=4)
    x = rng.normal(size=(8, 3, 9, 9))
    geometry = ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1])
    y = (im2col(x, *geometry) @ w.reshape(4, -1).T + b).reshape(8, 5, 5, 4).transpose(0, 3, 1, 2)
    keep_in, keep_out = np.array([True, False, True]), np.array([True, False, True, True])
    fit = PatchFit([3, 3], {"pads": [1, 1, 1, 1], "strides": [2, 2]}, keep_in, keep_out, rows_per_image=10)
    rows, pos = fit.targets(y)
    assert rows.shape == (8, 10, 3) and pos.shape == (8, 10)
    fit.add(rows, pos, x[:, keep_in])
    w2, b2 = fit.solve(ridge=1e-9)
    np.testing.assert_allclose(w2, w[keep_out][:, keep_in], atol=1e-5)
    np.testing.assert_allclose(b2, b[keep_out], atol=1e-5)


def test_channel_fit_folds_regression_into_weights():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 4))
    x_new = x[:, :3]
    x[:, 3] = x[:, 0] - 2 * x[:, 2] + 0.5  # removed feature is linear in the kept ones
    filters = rng.normal(size=(4, 2, 1))
    bias = rng.normal(size=2)
    fit = ChannelFit(filters, bias)
    fit.add(x, x_new)
    f, b2 = fit.solve(ridge=1e-12)
    y = x @ filters[:, :, 0] + bias
    np.testing.assert_allclose(x_new @ f[:, :, 0] + b2, y, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_recovery_cuts_held_out_error_on_real_model(ratio):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = os.path.join(root, "models", "fmnist_resnet.onnx")
    calib = os.path.join(root, "models", "fmnist_resnet_calib")
    on = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=ratio, max_images=128)).report
    off = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=ratio, max_images=128, recover=False)).report
    assert on.fidelity_relative_error < 0.5 * off.fidelity_relative_error
    assert on.fidelity_top1_agreement > off.fidelity_top1_agreement


def _shipped(name):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "models", f"{name}.onnx"), os.path.join(root, "models", f"{name}_calib")


def test_refit_is_measured_against_the_same_channels_sliced():
    model, calib = _shipped("mnist_cnn")
    report = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.5, max_images=128, latency=False)).report
    assert not report.refit_rejected and report.refitted_layers > 0
    without = report.fidelity_without_refit
    assert without is not None and report.fidelity_relative_error < 0.5 * without["relative_error"]
    assert "without the refit" in report.format_text()


def _sabotage_refit(monkeypatch):
    """Make every refit negate the Conv weights it writes: a refit that fits nothing, as one
    fitted to too few images can be on images it has not seen."""
    import onnxprune.api as api

    real = api.refit_sequential

    def sabotaged(original, pruned, *args, **kwargs):
        log = real(original, pruned, *args, **kwargs)
        inits = {t.name: t for t in pruned.graph.initializer}
        for node in pruned.graph.node:
            if node.name in log.patch + log.channel and node.op_type == "Conv":
                w = inits[node.input[1]]
                w.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(w), w.name))
        return log

    monkeypatch.setattr(api, "refit_sequential", sabotaged)


def test_refit_that_does_worse_on_held_out_images_is_not_written(monkeypatch):
    """The refit loses on the held-out images; what is written is the better of its channels
    sliced and the --no-recover conversion, never the refit."""
    _sabotage_refit(monkeypatch)
    model, calib = _shipped("mnist_cnn")
    opts = onnxprune.PruneOptions(flops=0.5, max_images=128, latency=False)
    result = onnxprune.prune(model, calib, opts)
    report = result.report
    assert report.refit_rejected and report.recovery
    assert any(n.startswith("the refit made the output error") for n in report.notes)
    assert "did worse on held-out images" in report.format_text()
    plain = onnxprune.prune(model, calib, opts.replace(recover=False))
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    if report.payoff == "local":  # the --no-recover conversion won: it is what was written
        assert report.fidelity_relative_error == plain.report.fidelity_relative_error
        np.testing.assert_array_equal(outputs(result.model, x)[0], outputs(plain.model, x)[0])
        assert any("did better still" in n for n in report.notes)
    else:  # the refit's channels sliced won
        assert report.fidelity_relative_error <= plain.report.fidelity_relative_error
    assert report.refitted_layers == 0
    assert report.fidelity_rejected_refit["relative_error"] > report.fidelity_relative_error
    _assert_filters_are_sliced_originals(model, result.model)


def _assert_filters_are_sliced_originals(model, written):
    """No filter written is refitted (here: negated): each is one of the original's
    (BatchNorm folded), sliced."""
    from onnxprune.prepare import prepare

    prepared, _ = prepare(onnx.load(model))
    name = [n for n in written.graph.node if n.op_type == "Conv"][1].name  # its input lost channels
    w_old, w_new = (_conv_weights(m, name) for m in (prepared, written))
    for f in w_new:
        assert any(all(any(np.array_equal(c, o) for o in g) for c in f) for g in w_old)


def _make_no_recover_lose(monkeypatch):
    """Make the --no-recover conversion's held-out error worse than any, so that where the refit
    is rejected its channels, sliced, are what is written."""
    import onnxprune.api as api

    real_at_target = api._at_target

    def at_target_with_bad_plain(run, opts, *args, **kwargs):
        result = real_at_target(run, opts, *args, **kwargs)
        if not opts.recover:
            result.report.fidelity_relative_error = float("inf")
        return result

    monkeypatch.setattr(api, "_at_target", at_target_with_bad_plain)


def test_sliced_refit_channels_are_written_when_they_beat_no_recover(monkeypatch):
    """Force the --no-recover conversion to lose (its held-out error made worse than any), so
    the rejected refit's channels, sliced, are what is written."""
    import onnxprune.api as api

    from onnxprune import refit

    _sabotage_refit(monkeypatch)
    _make_no_recover_lose(monkeypatch)
    # and one layer's fit raises, so that the refit's own report names it as left as sliced
    solve, calls, raised = refit.PatchFit.solve, [], []

    def solve_or_fail(self, ridge):
        calls.append(self)
        if len(calls) == 2:  # the second: the first layer's refit, negated, still spoils the model
            raised.append(self)
            raise ValueError("shapes do not match")
        return solve(self, ridge)

    monkeypatch.setattr(refit.PatchFit, "solve", solve_or_fail)
    model, calib = _shipped("mnist_cnn")
    result = api.prune(model, calib, onnxprune.PruneOptions(flops=0.5, max_images=128, latency=False))
    report = result.report
    assert raised and report.refit_rejected and report.payoff == "refit"
    assert any("did no better" in n for n in report.notes)
    # nothing said of the refit's layers survives: none of them is in the written model
    assert not any("left as sliced" in n or "ill-conditioned" in n for n in report.notes)
    # what is written is the refit's channels merely sliced: not refitted, and said so
    assert report.refitted_layers == 0 and report.fidelity_without_refit is None
    assert report.fidelity_rejected_refit["relative_error"] > report.fidelity_relative_error
    assert "with the rejected refit" in report.format_text()
    _assert_filters_are_sliced_originals(model, result.model)


def _test_digits(n):
    """The first ``n`` of mnist_cnn's shipped test digits, read as --eval reads them."""
    import os

    from onnxprune.api import load_labelled
    x, y = load_labelled(os.path.join(os.path.dirname(_shipped("mnist_cnn")[0]), "mnist_cnn_test.npz"))
    return x[:n].astype(np.float32), y[:n].astype(np.int64)


def test_eval_gives_the_accuracy_of_the_same_channels_without_the_refit(monkeypatch):
    """With --eval, what recovery bought is measured on the labelled set: the accuracy of the
    written (refitted) model and of the same channels merely sliced. Cross-checked against a run
    where the refit is sabotaged and the --no-recover conversion made to lose, so that those
    sliced channels are what is written."""
    import onnxprune.api as api
    from onnxprune.verify import accuracy

    model, calib = _shipped("mnist_cnn")
    x, y = _test_digits(300)
    opts = onnxprune.PruneOptions(flops=0.5, max_images=128, latency=False)
    report = onnxprune.prune(model, calib, opts, evaluate=(x, y)).report
    assert not report.refit_rejected and report.accuracy_rejected_refit is None
    # at -50% mnist_cnn's channels sliced lose tens of points that the refit gives back
    assert report.accuracy_without_refit < report.accuracy_after - 0.05
    assert "  without the refit" in report.format_text() and "(the same channels)" in report.format_text()
    assert report.seconds["evaluate"] > 0 and list(report.seconds)[-1] == "evaluate"

    _sabotage_refit(monkeypatch)
    _make_no_recover_lose(monkeypatch)
    forced = api.prune(model, calib, opts, evaluate=(x, y))
    assert forced.report.refit_rejected and forced.report.refitted_layers == 0
    assert forced.report.accuracy_without_refit is None
    assert forced.report.accuracy_after == report.accuracy_without_refit
    assert accuracy(forced.model, x, y, ["CPUExecutionProvider"]) == report.accuracy_without_refit
    # the sabotaged refit (weights negated) is measured too, and is what lost
    assert forced.report.accuracy_rejected_refit < forced.report.accuracy_after
    assert "  rejected refit" in forced.report.format_text()


def _conv_weights(model, node_name):
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[1])


def test_sampled_output_rows_and_gathered_patches_are_the_same_im2col_rows():
    from onnxprune.refit import gather_patches
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4, 9, 7)).astype(np.float32)
    geometry = ([3, 2], [2, 1], [1, 0, 1, 1], [1, 2])
    full = im2col(x, *geometry)
    per_image = full.shape[0] // 3
    y = rng.normal(size=(3, 6, 5, per_image // 5)).astype(np.float32)  # an output with as many positions
    keep_out = np.isin(np.arange(6), [0, 2, 5])
    fit = PatchFit([3, 2], {}, np.ones(4, dtype=bool), keep_out, rows_per_image=5)
    rows, pos = fit.targets(y)
    picked = (np.arange(3)[:, None] * per_image + pos).reshape(-1)
    np.testing.assert_array_equal(gather_patches(x, *geometry, pos), full[picked])
    np.testing.assert_array_equal(rows.reshape(-1, 3), y.reshape(3, 6, -1).transpose(0, 2, 1).reshape(-1, 6)[picked][:, keep_out])
    every = PatchFit([3, 2], {}, np.ones(4, dtype=bool), keep_out, rows_per_image=per_image)
    everything, none = every.targets(y)
    assert none is None and everything.shape == (3, per_image, 3)


def _fixed_batch(model, batch):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for vi in list(fixed.graph.input) + list(fixed.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    return fixed


def test_rows_taken_inside_the_graph_are_the_rows_taken_from_the_whole_output(monkeypatch):
    """The capture pass takes a patch fit's rows with a GatherElements where the output's shape
    is known, and from the whole output where it is not; where activations are large it runs a
    batch a few images at a time; a fixed-batch model's last batch is padded, and so are every
    batch and every run of a few images on the CUDA provider (runtime.keeps_shapes, forced here
    on the CPU). The refit must not tell any of them apart."""
    from onnxprune import recover
    from onnxprune.data import input_spec, load_calibration
    from onnxprune.recover import refit_sequential
    from onnxprune.rewrite import rewrite
    from onnxprune.shapes import static_shapes
    from surgery import analysis_of

    x = np.random.default_rng(1).normal(size=(50, 3, 8, 8)).astype(np.float32)
    opts = onnxprune.PruneOptions(flops=0.5, batch_size=16)  # 40 fitting images: batches of 16, 16 and 8
    refitted = []
    three = 3 * 8 * 8 * 8 * 4  # runs of 3 images
    for fixed, known, run_bytes, steady in ((False, True, recover.CAPTURE_RUN_BYTES, False), (False, True, three, False),
                                            (False, False, recover.CAPTURE_RUN_BYTES, False),
                                            (True, True, recover.CAPTURE_RUN_BYTES, False), (False, True, three, True)):
        monkeypatch.setattr(recover, "CAPTURE_RUN_BYTES", run_bytes)
        monkeypatch.setattr(recover, "keeps_shapes", lambda sess, steady=steady: steady)
        model = _fixed_batch(_redundant_model(), 16) if fixed else _redundant_model()
        cal = load_calibration(x, input_spec(model, opts), opts)
        assert len(cal.fit) == 40 and bool(cal.spec.fixed_batch) == fixed
        prepared, analysis = analysis_of(model)  # the surgery edits the analysis's graph
        keep = np.ones(analysis.num_players, dtype=bool)
        group = next(g for g in analysis.groups if g.prunable and len(g.players) == 8 and "Conv" in g.name)
        keep[np.flatnonzero(analysis.player_group == group.index)[[1, 4]]] = False
        shapes = static_shapes(prepared, {"input": (1, 3, 8, 8)}) if known else None
        pruned, changed = rewrite(analysis, keep, prepared)
        log = refit_sequential(prepared, pruned, analysis.keep_fn(keep), lambda name: 1, changed, cal, cal.fit,
                               ["CPUExecutionProvider"], shapes=shapes)
        assert log.patch
        refitted.append({t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer})
    for other in refitted[1:]:
        assert other.keys() == refitted[0].keys()
        for name, values in refitted[0].items():
            np.testing.assert_array_equal(values, other[name])


def test_padding_every_batch_to_one_shape_changes_nothing_the_tool_writes_or_reports(monkeypatch):
    """On the CUDA provider every batch is padded to one shape (runtime.keeps_shapes): the
    statistics, the refit, the fidelity and --eval must drop what the padding computes. Forced
    here on the CPU, with partial batches at every stage (72 fitting images and 18 held out in
    batches of 16, 300 labelled images in batches of 256)."""
    import os
    from onnxprune import calibrate, recover, verify

    model_path, calib = _shipped("mnist_cnn")
    test = np.load(os.path.join(os.path.dirname(model_path), "mnist_cnn_test.npz"))
    x, y = test["x"][:300].astype(np.float32), test["y"][:300].astype(np.int64)
    # the CPU provider: this compares numbers to 1e-5; on an H100, in a run of the suite beside
    # seven other test processes, the two conversions' weights differed by up to 4e-5
    opts = onnxprune.PruneOptions(flops=0.4, latency=False, max_images=90, batch_size=16, device="cpu")
    import onnxruntime as ort

    # session -> the set of its feeds' shapes, run by run; keyed by the session itself, which
    # stays alive so, since a freed session's id() is soon another's
    shapes_seen = {}
    run = ort.InferenceSession.run

    def recording_run(sess, names, feeds, *args, **kwargs):
        shapes_seen.setdefault(sess, set()).add(tuple(sorted((k, np.shape(v)) for k, v in feeds.items())))
        return run(sess, names, feeds, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", recording_run)
    capture_default = recover.CAPTURE_RUN_BYTES
    monkeypatch.setattr(recover, "CAPTURE_RUN_BYTES", 5 * 32 * 28 * 28 * 4)  # the capture in runs of 5 images
    results, shapes = [], []
    for steady in (False, True):
        for module in (calibrate, recover, verify):
            monkeypatch.setattr(module, "keeps_shapes", lambda sess, steady=steady: steady)
        shapes_seen.clear()
        results.append(onnxprune.prune(model_path, calib, opts, evaluate=(x, y)))
        shapes.append([seen for seen in shapes_seen.values() if len(seen) > 1])
    plain, padded = results
    # every session that ran saw one shape of feeds; without the padding some saw several
    assert not shapes[1] and shapes[0], shapes[1]
    assert plain.report.refitted_layers > 0
    weights_of = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = weights_of(plain.model), weights_of(padded.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for field in ("fidelity_relative_error", "fidelity_top1_agreement", "accuracy_after", "accuracy_before"):
        assert getattr(padded.report, field) == pytest.approx(getattr(plain.report, field), rel=1e-5), field
    # the capture's memory bound allows far more than a batch of these small images a run: it
    # takes one batch at a time, padded to no more than the batch
    monkeypatch.setattr(recover, "CAPTURE_RUN_BYTES", capture_default)
    shapes_seen.clear()
    onnxprune.prune(model_path, calib, opts)
    fed = [dict(feeds)["input"][0] for seen in shapes_seen.values() for feeds in seen if "input" in dict(feeds)]
    assert fed and max(fed) == 16, fed


def test_depthwise_convs_keep_their_filters_and_the_layers_around_them_are_refitted():
    # a depthwise conv's kept outputs read only kept channels: it stays as sliced, with no cut
    # of its own, and the dense layers before and after it are refitted
    import tiny
    model = tiny.residual_cnn()
    x = np.random.default_rng(0).normal(size=(96, 3, 8, 8)).astype(np.float32)
    on = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.4, latency=False, round_to=1))
    off = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.4, latency=False, recover=False, round_to=1))
    assert not any("no refit" in n or "ill-conditioned" in n for n in on.report.notes)
    assert on.report.fidelity_relative_error < off.report.fidelity_relative_error

    def depthwise_filters(m):
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        node = next(n for n in m.graph.node if n.op_type == "Conv"
                    and any(a.name == "group" and a.i > 1 for a in n.attribute))
        return inits[node.input[1]]

    before, after = depthwise_filters(model), depthwise_filters(on.model)
    assert len(after) < len(before)  # the group was pruned
    rows = [int(np.flatnonzero((before == f).all(axis=(1, 2, 3)))[0]) for f in after]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)  # each a kept original filter, in order


def test_grouped_convs_are_named_as_left_sliced_and_the_rest_is_refitted():
    import tiny
    model = tiny.grouped_cnn()
    x = np.random.default_rng(1).normal(size=(96, 3, 8, 8)).astype(np.float32)
    on = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.3, latency=False, round_to=1, holdout=0.0))
    note = next(n for n in on.report.notes if n.startswith("no refit for these layers (grouped convs"))
    grouped = [n.name for n in on.model.graph.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    named = note.split(": ", 1)[1].split(", ")
    assert named and set(named) <= set(grouped)
    assert on.report.refitted_layers > 0  # the Gemm head at least
    onnx.checker.check_model(on.model, full_check=True)


def test_channel_fit_with_fewer_samples_than_channels_keeps_means_only():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 40)) + 3.0  # four samples, forty channels (36 unknowns)
    keep = np.arange(40) < 35
    filters = rng.normal(size=(40, 2, 1))
    bias = rng.normal(size=2)
    fit = ChannelFit(filters, bias, 1, keep)
    fit.add(x, x[:, keep])
    f, b2 = fit.solve(ridge=1e-3)
    # kept channels keep their weights; removed ones contribute their mean through the bias
    np.testing.assert_allclose(f[:, :, 0], filters[keep, :, 0], atol=1e-9)
    np.testing.assert_allclose(b2, bias + x[:, ~keep].mean(axis=0) @ filters[~keep, :, 0], atol=1e-9)


def test_without_held_out_images_the_refit_is_kept_unchecked_and_said():
    model, calib = _shipped("mnist_cnn")
    report = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.5, max_images=64, holdout=0.0,
                                                                  latency=False)).report
    assert report.refitted_layers > 0 and not report.refit_rejected and report.fidelity_without_refit is None
    assert any("not checked against slicing" in n for n in report.notes)
    assert "fidelity on 64 calibration images (none held out: the ones pruning used)" in report.format_text()


def test_a_fixed_batch_model_is_refitted_and_evaluated_whatever_the_image_counts():
    # batch 4 fixed in the graph; 25 fitting images and 103 labelled ones leave partial batches,
    # which the refit's segments and --eval must pad (the segments failed: "Got: 1 Expected: 4")
    import os
    model_path, calib = _shipped("mnist_cnn")
    model = onnx.load(model_path)
    for vi in list(model.graph.input) + list(model.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.ClearField("dim_param")
        d.dim_value = 4
    test = np.load(os.path.join(os.path.dirname(model_path), "mnist_cnn_test.npz"))
    x, y = test["x"][:103].astype(np.float32), test["y"][:103].astype(np.int64)
    result = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.4, latency=False, max_images=31),
                             evaluate=(x, y))
    report = result.report
    assert report.refitted_layers > 0 and report.accuracy_after > 0.9
    dims = [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == 4


def _broken_candidates(model):
    """The model with its last Gemm giving 9 classes instead of 10 (declared output untouched),
    and with its first conv's weights given the wrong input channels (cannot be loaded)."""
    fewer = onnx.ModelProto()
    fewer.CopyFrom(model)
    last = [n for n in fewer.graph.node if n.op_type == "Gemm"][-1]
    trans_b = any(a.name == "transB" and a.i for a in last.attribute)
    for t in fewer.graph.initializer:
        if t.name in last.input[1:]:
            v = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(v[:9] if v.ndim == 1 or trans_b else v[:, :9], t.name))
    unloadable = onnx.ModelProto()
    unloadable.CopyFrom(model)
    first = next(n for n in unloadable.graph.node if n.op_type == "Conv")
    for t in unloadable.graph.initializer:
        if t.name == first.input[1]:
            v = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(np.concatenate([v, v], axis=1), t.name))
    return fewer, unloadable


def test_fidelity_pass_refuses_a_candidate_onnxruntime_cannot_run_or_that_changes_outputs():
    from onnxprune.data import input_spec, load_calibration
    from onnxprune.errors import InternalError
    from onnxprune.verify import fidelity
    from tiny import plain_cnn

    model = plain_cnn()
    opts = onnxprune.PruneOptions(flops=0.3)
    cal = load_calibration(np.random.default_rng(0).random((40, 3, 8, 8), dtype=np.float32),
                           input_spec(model, opts), opts)
    fewer, unloadable = _broken_candidates(model)
    assert fidelity(model, [model], cal, ["CPUExecutionProvider"])[0].relative_error == 0.0
    for broken in (fewer, unloadable):
        with pytest.raises(InternalError, match=r"(cannot (load|run) the pruned model|changed shape).*nothing written"):
            fidelity(model, [model, broken], cal, ["CPUExecutionProvider"])


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [1, 2]},
    {"pads": [2, 1, 2, 0], "strides": [1, 2], "dilations": [2, 1]},
    {"pads": [0, 0, 0, 0], "dilations": [2, 2]},
])
def test_patch_fit_against_onnxruntime_conv_output_gives_the_layer_back(attrs):
    """The target comes from onnxruntime's Conv and the patches from our geometry: they must
    agree on every padding, stride and dilation, or the fit cannot be exact."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = rng.normal(size=(5, 3, 3, 2)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    x = rng.normal(size=(6, 3, 11, 9)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 2], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 3, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    fit = PatchFit([3, 2], attrs, np.ones(3, dtype=bool), np.ones(5, dtype=bool), rows_per_image=7)
    fit.add(*fit.targets(y), x)
    w2, b2 = fit.solve(ridge=1e-9)
    np.testing.assert_allclose(w2, w, atol=1e-4)
    np.testing.assert_allclose(b2, b, atol=1e-4)


def _matmul_head_model():
    from onnx import numpy_helper

    b = Builder(channels=3, size=6, seed=2)
    x = b.relu(b.conv("input", 3, 16))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    model = b.model(b.node("MatMul", [x, b.init(b.rng.normal(size=(16, 4)))]), ["N", 4])
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dead = [2, 5, 7, 9, 11, 13]  # zero filters, positive biases: constant channels after the ReLU
    for t in model.graph.initializer:
        v = numpy_helper.to_array(t).copy()
        if t.name == conv.input[1]:
            v[dead] = 0.0
        elif t.name == conv.input[2]:
            v[dead] = np.linspace(0.5, 1.0, len(dead))
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(v, t.name))
    return model


def test_a_matmul_whose_fit_fails_keeps_no_bias_node(monkeypatch):
    monkeypatch.setattr(ChannelFit, "solve", lambda self, ridge: None)
    calib = np.random.default_rng(0).normal(size=(64, 3, 6, 6)).astype(np.float32)
    result = onnxprune.prune(_matmul_head_model(), calib, onnxprune.PruneOptions(flops=0.3, round_to=1, latency=False))
    assert [n.op_type for n in result.model.graph.node][-1] == "MatMul"
    assert result.model.graph.node[-1].output[0] == result.model.graph.output[0].name
    assert not any(t.name.endswith("_bias") for t in result.model.graph.initializer)


def test_a_refitted_matmul_gets_the_bias_its_fit_solved_for():
    """A MatMul has no bias input: the refit writes its bias into an Add after it. Channels
    that are constant (dead filters with a bias) carry only their mean, so once they are
    removed and the MatMul refitted, the model computes nearly what it did (the ridge keeps
    it from exact). Without the bias the refit's output error was 0.93 on the held-out
    images, worse than slicing, and was not written; the sliced model erred by 0.13."""
    from onnx import numpy_helper

    model = _matmul_head_model()
    calib = np.random.default_rng(0).normal(size=(64, 3, 6, 6)).astype(np.float32)
    result = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.3, round_to=1, latency=False))
    pruned = result.model
    kept = next(numpy_helper.to_array(t) for t in pruned.graph.initializer
                if t.name == next(n for n in pruned.graph.node if n.op_type == "Conv").input[1])
    assert len(kept) < 16 and result.report.refitted_layers >= 1 and not result.report.refit_rejected
    assert [n.op_type for n in pruned.graph.node][-2:] == ["MatMul", "Add"]
    test = np.random.default_rng(1).normal(size=(8, 3, 6, 6)).astype(np.float32)
    assert rel_error(outputs(model, test), outputs(pruned, test)) < 0.03


def _wide_low_rank_model():
    """conv 3->64, then a conv 64->160 whose filters span only 40 directions (so any 40 of its
    channels predict the others pixel by pixel), then a 3x3 conv reading those 160 channels,
    GAP and Gemm. Returns the model, the wide conv's name and the output tensors of the other
    convs (their channel groups are left whole)."""
    b = Builder(channels=3, size=6, seed=7)
    x = b.relu(b.conv("input", 3, 64))
    x = b.conv(x, 64, 160)
    w = onnx.numpy_helper.to_array(b.inits[2])
    rng = np.random.default_rng(7)
    low = (rng.normal(size=(160, 40)) @ rng.normal(size=(40, 64 * 9)) / np.sqrt(40 * 64 * 9)).reshape(w.shape)
    b.inits[2] = onnx.numpy_helper.from_array(low.astype(np.float32), b.inits[2].name)
    x = b.relu(b.conv(x, 160, 32))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    model = b.model(b.gemm(x, 32, 10), ["N", 10])
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return model, convs[2].name, (convs[0].output[0], convs[2].output[0])


@pytest.mark.parametrize("flops, kept, fit", [(0.09, 144, "channel"), (0.19, 128, "patch")])
def test_a_conv_too_wide_for_the_exact_fit_is_refitted_channel_by_channel(monkeypatch, flops, kept, fit):
    """The 3x3 conv reading the 160-channel group is fitted over im2col patches while its kept
    inputs x taps are at most refit.PATCH_LIMIT (1200: 128 x 9), channel by channel beyond
    (144 x 9); either way the refit brings the pruned model close to the original."""
    import onnxprune.api as api

    logs = []
    real = api.refit_sequential

    def logged(*args, **kwargs):
        logs.append(real(*args, **kwargs))
        return logs[-1]

    monkeypatch.setattr(api, "refit_sequential", logged)
    model, name, whole = _wide_low_rank_model()
    calib = np.random.default_rng(0).normal(size=(96, 3, 6, 6)).astype(np.float32)
    opts = onnxprune.PruneOptions(flops=flops, ignore=whole, round_to=16, latency=False)
    result = onnxprune.prune(model, calib, opts)
    wide = next(n for n in result.model.graph.node if n.name == name)
    assert onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == wide.input[1])).shape[1] == kept
    assert name in getattr(logs[-1], fit)
    report = result.report
    assert not report.refit_rejected
    assert report.fidelity_relative_error < 0.2 * report.fidelity_without_refit["relative_error"]
    x = np.random.default_rng(1).normal(size=(16, 3, 6, 6)).astype(np.float32)
    assert rel_error(outputs(model, x), outputs(result.model, x)) < 0.05


def test_layers_whose_input_is_made_before_a_step_share_it_and_the_model_is_the_same(monkeypatch):
    """The 1x1 projection of the second residual block reads the block's input, made before the
    block's first conv is refitted: it is fitted in the same step as the conv before it (one
    run of the segment fewer), and the refitted model is weight for weight the one that one
    step per layer gives."""
    from onnxprune import recover
    from tiny import residual_cnn

    model = residual_cnn(seed=3)
    calib = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    # the CPU provider: weight for weight equality is a claim about the schedule; on an H100 the
    # two conversions were equal when run alone, padded or not, but not in a run of the suite
    # beside seven other test processes (why was not measured)
    opts = onnxprune.PruneOptions(flops=0.3, round_to=1, latency=False, device="cpu")
    steps = []
    real = recover._waves

    def recorded(pruned, layers):
        steps.append((len(layers), real(pruned, layers)))
        return steps[-1][1]

    monkeypatch.setattr(recover, "_waves", recorded)
    shared = onnxprune.prune(model, calib, opts).model
    layers, waves = steps[-1]
    assert len(waves) < layers and any(len(w) > 1 for w in waves)
    monkeypatch.setattr(recover, "_waves", lambda pruned, layers: [[k] for k in range(len(layers))])
    alone = onnxprune.prune(model, calib, opts).model
    weights_of = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = weights_of(shared), weights_of(alone)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_narrow_layers_exact_fit_draws_at_least_min_rows():
    """A 3x3 conv reading 8 channels has 73 unknowns: 16 rows each would be 1168 over all images;
    the fit draws at least refit.MIN_ROWS (4096), as far as the images have positions."""
    from onnxprune import recover
    from onnxprune.refit import MIN_ROWS

    b = Builder(channels=8, size=16)
    model = b.model(b.conv("input", 8, 8), ["N", 8, 16, 16])
    conv = model.graph.node[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    fit = recover._patch_fit(conv, inits, lambda name: None, 64, 0)
    assert fit.rows_per_image * 64 >= MIN_ROWS > 16 * 73
    few = recover._patch_fit(conv, inits, lambda name: None, 4096, 0)
    assert few.rows_per_image == 1  # 4096 images: one position each is enough


def test_a_new_bias_does_not_take_the_name_of_another_tensor():
    # a Conv without bias, followed by a separate BiasAdd whose constant is named "<conv>_bias"
    # (as exporters name it): the refit gives the Conv a bias of its own under another name
    from onnx import helper, numpy_helper

    b = Builder(channels=3, size=8, seed=3)
    x = b.relu(b.conv("input", 3, 8))
    w2 = b.init(b.rng.normal(0, 0.3, (8, 8, 3, 3)))
    b.nodes.append(helper.make_node("Conv", [x, w2], ["c2_out"], name="c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    b.inits.append(numpy_helper.from_array(b.rng.normal(0, 1.0, (1, 8, 1, 1)).astype(np.float32), "c2_bias"))
    y = b.relu(b.node("Add", ["c2_out", "c2_bias"]))
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    model = b.model(b.gemm(y, 8, 5), ["N", 5])
    xs = np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32)
    result = onnxprune.prune(model, xs, onnxprune.PruneOptions(flops=0.3, holdout=0.0, latency=False))
    assert result.report.refitted_layers >= 2
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    (add,) = [n for n in pruned.graph.node if n.op_type == "Add" and "c2_out" in n.input]
    (conv,) = [n for n in pruned.graph.node if n.name == "c2"]
    assert len(conv.input) == 3 and conv.input[2] != add.input[1]
    assert rel_error(outputs(model, xs), outputs(pruned, xs)) < 0.2


def test_constant_channels_fold_into_a_strided_conv_transpose_by_its_mean_over_phases():
    # conv1's filters 4..7 are zero with bias 1: after the ReLU those channels are exactly 1.0,
    # and pruning them should move the ConvTranspose's bias by what they added on average. A
    # stride-2 ConvTranspose gives each output pixel a quarter of its 4x4 taps, so that is a
    # quarter of the tap sums, not all of them (which left the model further off than no fold)
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w1[4:] = 0
    b1 = np.zeros(8, np.float32)
    b1[4:] = 1.0
    wt = rng.normal(0, 0.3, (8, 4, 4, 4)).astype(np.float32)
    bt = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["y"], name="up", kernel_shape=[4, 4], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 4, 16, 16])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (wt, "wt"), (bt, "bt"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    xs = rng.random((64, 3, 8, 8), dtype=np.float32)
    result = onnxprune.prune(model, xs, onnxprune.PruneOptions(flops=0.45, round_to=1, holdout=0.0, latency=False))
    pruned = result.model
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    (conv1_w,) = [v for v in inits.values() if v.ndim == 4 and v.shape[1] == 3]
    assert np.array_equal(conv1_w, w1[:4])  # the constant channels are the ones removed
    (up,) = [n for n in pruned.graph.node if n.op_type == "ConvTranspose"]
    shift = inits[up.input[2]] - bt
    np.testing.assert_allclose(shift, wt[4:].sum(axis=(0, 2, 3)) / 4, rtol=1e-4, atol=1e-6)


def _skip_path_model():
    """A conv whose input channels get pruned (so its refit is not exact) makes the skip
    tensor of a residual block: conv A -> relu -> conv S -> relu = t -> conv 1 (wider) -> relu ->
    conv 2, Add(conv 2, t) -> relu -> GAP -> Gemm. Returns the model and the sum's name."""
    b = Builder(seed=5)
    a = b.relu(b.conv("input", 3, 8))
    t = b.relu(b.conv(a, 8, 8))
    y = b.relu(b.conv(t, 8, 16))
    total = b.node("Add", [b.conv(y, 16, 8), t])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.relu(total)])], axis=1)
    return b.model(b.gemm(x, 8, 5), ["N", 5]), total


def _refit_first_group(model, x, monkeypatch, plain: bool):
    """``model`` with 4 of the 8 channels of its first conv removed and the layers after
    refitted; ``plain``: every fit matches its own layer's output (no residual sums, no Relu steps)."""
    from onnxprune import recover
    from onnxprune.data import input_spec, load_calibration
    from onnxprune.rewrite import rewrite
    from surgery import analysis_of

    if plain:
        monkeypatch.setattr(recover, "_output_uses", lambda original, o_nodes, names, *args: {
            n: recover._OutputUse(o_nodes[n].output[0]) for n in names})
    opts = onnxprune.PruneOptions(flops=0.5)
    cal = load_calibration(x, input_spec(model, opts), opts)
    prepared, analysis = analysis_of(model)
    group = min((g for g in analysis.groups if g.prunable), key=lambda g: g.index)
    keep = np.ones(analysis.num_players, dtype=bool)
    keep[np.flatnonzero(analysis.player_group == group.index)[4:]] = False
    pruned, changed = rewrite(analysis, keep, prepared)
    log = recover.refit_sequential(prepared, pruned, analysis.keep_fn(keep), lambda name: 1, changed, cal, cal.fit,
                                   ["CPUExecutionProvider"], ridge=1e-9, shapes=analysis.shapes)
    assert len(log.patch) == 3 and not log.failed
    onnx.checker.check_model(pruned, full_check=True)
    return pruned


def test_a_residual_blocks_last_conv_makes_up_for_the_error_its_skip_path_carries(monkeypatch):
    """Fitted against the block's sum less the pruned skip tensor, the last conv takes on the
    skip path's error too (the conv making the skip tensor lost input channels): the sum is
    closer to the original's than with the conv fitted to its own output."""
    from onnxprune import recover
    from onnxprune.runtime import expose

    model, total = _skip_path_model()
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    monkeypatch.setattr(recover, "RELU_STEPS", 0)
    residual = _refit_first_group(model, x, monkeypatch, plain=False)
    plain = _refit_first_group(model, x, monkeypatch, plain=True)
    want = outputs(expose(model, [total]), x)
    err_residual = rel_error(want, outputs(expose(residual, [total]), x))
    err_plain = rel_error(want, outputs(expose(plain, [total]), x))
    assert err_residual < 0.97 * err_plain, (err_residual, err_plain)


def test_relu_steps_lower_the_error_after_the_relu_and_never_raise_it():
    """A layer that lost input channels cannot match the original pre-activation; least
    squares on it spends the fit on negative entries the Relu erases. Each majorize-minimize
    step lowers the post-Relu error on the fitted rows, and the last is well below plain
    least squares'."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6, 6, 6)).astype(np.float32)
    w = rng.normal(size=(5, 6, 3, 3)) / np.sqrt(54)
    cols = im2col(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    y = (cols @ w.reshape(5, -1).T - 0.3).reshape(64, 6, 6, 5).transpose(0, 3, 1, 2)
    keep_in = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1]}
    errors = []
    for steps in range(4):
        fit = PatchFit([3, 3], attrs, keep_in, np.ones(5, dtype=bool), rows_per_image=36, relu_steps=steps)
        fit.add(*fit.targets(y), x[:, keep_in])
        w2, b2 = fit.solve(ridge=1e-9)
        u = im2col(x[:, keep_in], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]) @ w2.reshape(5, -1).T + b2
        errors.append(float(((np.maximum(u, 0) - np.maximum(y.transpose(0, 2, 3, 1).reshape(-1, 5), 0)) ** 2).sum()))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.95 * errors[0], errors


@pytest.mark.parametrize("images,held_out", [(3, 0), (8, 2), (64, 13)])
def test_a_refit_on_few_calibration_images_says_how_little_backs_it(images, held_out):
    """fmnist_resnet at -40% refitted on 3 images fell to 26% top-1 (92% before), and with none
    held out its fidelity is measured on the images it was fitted on: the report says so."""
    model, calib = _shipped("fmnist_resnet")
    report = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.4, max_images=images, latency=False)).report
    assert report.holdout_images == held_out
    few = [n for n in report.notes if n.startswith(f"only {images} calibration images")]
    if images < 64:
        shown = "none is held out to show it" if not held_out else f"the {held_out} held out show little of it"
        assert len(few) == 1 and shown in few[0] and "a few hundred are best" in few[0]
    else:
        assert few == []
    # without a refit there is nothing to warn of
    plain = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.4, max_images=images, latency=False,
                                                                  recover=False)).report
    assert not any(n.startswith("only ") for n in plain.notes)


def _sequence_head():
    """A CRNN-style head: conv backbone, then Transpose/Reshape to a sequence (N, L=8, F=64) and a
    MatMul over its features, which sit on the last axis."""
    b = Builder(size=8, seed=41)
    x = b.relu(b.conv("input", 3, 16))
    x = b.relu(b.conv(x, 16, 16))
    x = b.relu(b.conv(x, 16, 8))
    x = b.node("Transpose", [x], perm=[0, 3, 1, 2])
    x = b.node("Reshape", [x, b.ints([0, 8, 64])])
    x = b.relu(b.node("MatMul", [x, b.init(b.rng.normal(0, 1 / 8, (64, 32)))]))
    x = b.node("ReduceMean", [x], axes=[1], keepdims=0)
    return b.model(b.gemm(x, 32, 10), ["N", 10])


def test_a_matmul_over_a_sequence_downstream_of_a_cut_is_left_alone_not_refitted_on_the_wrong_axis():
    # the refit read axis 1 as the MatMul's channels, the sequence here: the solve raised on the
    # shapes and the conversion failed
    model = _sequence_head()
    matmul = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    x = np.random.default_rng(1).normal(size=(80, 3, 8, 8)).astype(np.float32)
    on = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.4, round_to=1, min_keep=0.0, latency=False))
    off = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.4, round_to=1, min_keep=0.0, latency=False,
                                                            recover=False))
    onnx.checker.check_model(on.model, full_check=True)
    assert any(n.startswith("no refit for these layers") and n.endswith(matmul) for n in on.report.notes)
    assert on.report.refitted_layers > 0
    assert on.report.fidelity_relative_error < off.report.fidelity_relative_error


def test_a_fit_that_raises_leaves_its_layer_as_sliced_and_the_others_refitted(monkeypatch):
    from onnxprune import refit

    model, calib = _shipped("mnist_cnn")
    solve = refit.PatchFit.solve
    failing = []

    def solve_or_fail(self, ridge):
        if not failing:  # the first patch fit made
            failing.append(self)
            raise ValueError("shapes do not match")
        return solve(self, ridge)

    monkeypatch.setattr(refit.PatchFit, "solve", solve_or_fail)
    report = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.4, max_images=64, latency=False)).report
    failed = [n for n in report.notes if n.startswith("refit not solved")]
    assert len(failed) == 1 and failed[0].endswith("(ValueError: shapes do not match)")  # one layer, and why
    assert report.refitted_layers >= 2


def test_a_patch_fit_solves_the_same_twice():
    # the prior's term is added to the right-hand side for the solve, not into the fit's sums
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    fit = PatchFit([3, 3], {"pads": [1, 1, 1, 1]}, np.array([1, 1, 0], dtype=bool), np.ones(5, dtype=bool),
                   rows_per_image=36, prior=(w, None))
    target = im2col(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]) @ w.reshape(5, -1).T
    fit.add(target.reshape(4, 36, 5), None, x[:, :2])
    first, second = fit.solve(ridge=0.1), fit.solve(ridge=0.1)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_where_slicing_is_exact_the_refit_stays_exact():
    """14 of the stem's 16 filters are dead (zero after the Relu): removing them changes nothing,
    and every refitted layer downstream must keep computing what it did. The ridge used to pull
    the fits toward zero weights, which added a relative output error of 0.016 where slicing had
    none; it pulls toward the sliced original now."""
    b = Builder(size=8, seed=51)
    w = b.rng.normal(0, 1 / np.sqrt(27), (16, 3, 3, 3))
    bias = b.rng.normal(0, 0.1, 16)
    w[:14], bias[:14] = 0.0, -1.0
    x = b.relu(b.node("Conv", ["input", b.init(w), b.init(bias, "b")], kernel_shape=[3, 3], pads=[1] * 4))
    x = b.relu(b.conv(x, 16, 16))
    x = b.relu(b.conv(x, 16, 16))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    model = b.model(b.gemm(x, 16, 10), ["N", 10])
    data = np.random.default_rng(1).normal(size=(80, 3, 8, 8)).astype(np.float32)
    # no held-out images: the refit is written without being checked against slicing
    result = onnxprune.prune(model, data, onnxprune.PruneOptions(flops=0.3, round_to=1, min_keep=0.0, latency=False,
                                                                  holdout=0.0))
    assert result.report.refitted_layers >= 2 and not result.report.refit_rejected
    assert rel_error(outputs(result.model, data), outputs(model, data)) < 1e-5
