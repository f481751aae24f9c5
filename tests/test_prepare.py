"""prepare(): graph normalisations that change nothing the network computes."""

import numpy as np
import onnx
from onnx import numpy_helper

import tiny
from onnxprune.prepare import prepare
from surgery import analysis_of, kill_players, outputs, prune_players, rel_error, sample


def _int64(b: tiny.Builder, value) -> str:
    name = f"const{len(b.inits)}"
    b.inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
    return name


def _chunk_with_computed_bounds() -> onnx.ModelProto:
    """torch's ``x.chunk(2, dim=1)`` at opset 13+: Slice bounds computed from the channel count,
    Shape -> Gather(1) -> Add -> Div -> Mul, as the corpus ShuffleNetV2 has them. No
    intermediate shapes are stored, as torch writes none."""
    b = tiny.Builder(channels=3, size=8)
    x = b.relu(b.conv("input", 3, 8))
    c = b.node("Gather", [b.node("Shape", [x]), _int64(b, [1])], axis=0)
    half = b.node("Div", [b.node("Add", [c, _int64(b, [1])]), _int64(b, [2])])
    second = b.node("Slice", [x, half, b.node("Mul", [half, _int64(b, [2])]), _int64(b, [1])])
    y = b.conv(second, 4, 6)
    model = b.model(b.node("GlobalAveragePool", [y]), ["N", 6, 1, 1])
    del model.graph.value_info[:]
    return model


def test_shape_arithmetic_on_static_axes_folds_without_stored_shapes():
    # onnx-graphsurgeon folds Shape -> Gather only where it knows the tensor's shape; torch
    # stores no intermediate shapes, so the chunk's bounds stayed computed (the corpus
    # ShuffleNetV2 kept all 217 nodes) and no rule could read them
    model = _chunk_with_computed_bounds()
    prepared, log = prepare(model)
    inits = {t.name for t in prepared.graph.initializer}
    (slice_node,) = [n for n in prepared.graph.node if n.op_type == "Slice"]
    assert all(name in inits for name in slice_node.input[1:])
    assert not any(n.op_type == "Shape" for n in prepared.graph.node) and log.folded_nodes >= 5
    x = sample(model)
    assert rel_error(outputs(model, x), outputs(prepared, x)) < 1e-6


def _view_flatten() -> onnx.ModelProto:
    """conv, then torch's ``x.view(x.size(0), -1)`` with a dynamic batch: the target is
    Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]), then a Gemm."""
    b = tiny.Builder(channels=3, size=4)
    x = b.relu(b.conv("input", 3, 8))
    n = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [x]), _int64(b, 0)], axis=0), _int64(b, [0])])
    flat = b.node("Reshape", [x, b.node("Concat", [n, _int64(b, [-1])], axis=0)])
    model = b.model(b.gemm(flat, 8 * 16, 5), ["N", 5])
    del model.graph.value_info[:]
    return model


def _shuffle() -> onnx.ModelProto:
    """conv 3->8, torchvision's channel_shuffle(x, 2) as torch exports it (every size read
    from x with Shape -> Gather), conv 8->6."""
    b = tiny.Builder(channels=3, size=4)
    x = b.relu(b.conv("input", 3, 8))
    shape = b.node("Shape", [x])
    n, c, h, w = (b.node("Unsqueeze", [b.node("Gather", [shape, _int64(b, i)], axis=0), _int64(b, [0])])
                  for i in range(4))
    per_group = b.node("Div", [c, _int64(b, [2])])
    y = b.node("Reshape", [x, b.node("Concat", [n, _int64(b, [2]), per_group, h, w], axis=0)])
    y = b.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = b.node("Reshape", [y, b.node("Concat", [n, c, h, w], axis=0)])
    model = b.model(b.node("GlobalAveragePool", [b.conv(y, 8, 6)]), ["N", 6, 1, 1])
    del model.graph.value_info[:]
    return model


def _targets(prepared: onnx.ModelProto):
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in prepared.graph.initializer}
    return [inits.get(n.input[1]) for n in prepared.graph.node if n.op_type == "Reshape"]


def test_view_flatten_target_becomes_copy_batch_and_the_conv_prunable():
    # x.view(x.size(0), -1) read the batch through Shape, which no rule follows: the last
    # conv's channels were blocked in every model flattened that way
    model = _view_flatten()
    prepared, log = prepare(model)
    assert _targets(prepared) == [[0, -1]] and log.copied_dims == 1
    assert not any(n.op_type == "Shape" for n in prepared.graph.node)
    for batch in (1, 3):
        x = sample(model, batch)
        assert rel_error(outputs(model, x), outputs(prepared, x)) < 1e-6
    _, analysis = analysis_of(model)
    (group,) = [g for g in analysis.prunable_groups() if g.size == 8]
    killed = kill_players(model, {group.index: [1, 5]})
    pruned = prune_players(killed, {group.index: [1, 5]})
    x = sample(model, 3)
    assert rel_error(outputs(killed, x), outputs(pruned, x)) < 1e-5


def test_shuffle_targets_become_constants_through_the_batch_symbol():
    # the second reshape reads the batch of the tensor before the shuffle: shape inference
    # gives both the same symbol, so its entry can copy the transposed tensor's
    model = _shuffle()
    prepared, log = prepare(model)
    assert _targets(prepared) == [[0, 2, 4, 4, 4], [0, 8, 4, 4]] and log.copied_dims == 2
    for batch in (1, 5):
        x = sample(model, batch)
        assert rel_error(outputs(model, x), outputs(prepared, x)) < 1e-6


def test_prepare_is_idempotent_on_what_it_folds():
    # the exactness tests prepare a model twice (kill, then prune the killed copy) and rely
    # on the same groups both times (stale stored shapes once let the second pass fold more
    # of the corpus AlexNet, whose dead-channel test then indexed the wrong groups)
    for model in (_chunk_with_computed_bounds(), _view_flatten(), _shuffle()):
        once, _ = prepare(model)
        twice, log = prepare(once)
        assert [n.name for n in twice.graph.node] == [n.name for n in once.graph.node]
        assert log.copied_dims == 0


def _gemm_head(alpha: float, beta: float, opset: int = 13, with_c: bool = True) -> onnx.ModelProto:
    b = tiny.Builder(channels=3, size=8, seed=1, opset=opset)
    x = b.relu(b.conv("input", 3, 8))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    inputs = [x, b.init(b.rng.normal(0, 0.25, (10, 8)) / alpha)]
    if with_c:
        inputs.append(b.init(b.rng.normal(0, 0.1, 10), "b"))
    return b.model(b.node("Gemm", inputs, transB=1, alpha=alpha, beta=beta), ["N", 10])


def test_gemm_scales_fold_into_its_constants():
    # the refit writes a layer's intercept into C: every Gemm must compute A B + C
    for alpha, beta, opset in [(0.25, 1.0, 13), (1.0, 3.0, 13), (0.5, 0.0, 13), (2.0, 0.0, 9)]:
        model = _gemm_head(alpha, beta, opset)
        prepared, _ = prepare(model)
        (gemm,) = [n for n in prepared.graph.node if n.op_type == "Gemm"]
        assert all(a.f == 1.0 for a in gemm.attribute if a.name in ("alpha", "beta")), (alpha, beta, opset)
        onnx.checker.check_model(prepared, full_check=True)
        x = sample(model)
        assert rel_error(outputs(model, x), outputs(prepared, x)) < 1e-6, (alpha, beta, opset)


def test_refit_of_a_scaled_gemm_matches_the_unscaled_one():
    # (alpha 1, B) and (alpha 0.25, 4 B) are one function: pruned alike, refitted alike
    import onnxprune

    xs = np.random.default_rng(0).normal(1.0, 1.0, (200, 3, 8, 8)).astype(np.float32)
    opts = onnxprune.PruneOptions(flops=0.5, holdout=0.0, round_to=1, latency=False)
    plain = onnxprune.prune(_gemm_head(1.0, 1.0), xs, opts).model
    scaled = onnxprune.prune(_gemm_head(0.25, 1.0), xs, opts).model
    x = xs[:50]
    assert rel_error(outputs(plain, x), outputs(scaled, x)) < 1e-5


def test_declared_outputs_survive_the_folds():
    # torch names output dims it cannot tell ('classes' here); inference during the folds fills
    # them in, and the model written must still declare what the original did
    model = _view_flatten()
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "classes"
    prepared, log = prepare(model)
    assert log.copied_dims == 1
    assert prepared.graph.output[0] == model.graph.output[0]
    import onnxprune

    x = np.random.default_rng(0).random((32, 3, 4, 4), dtype=np.float32)
    pruned = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.3, latency=False)).model
    assert pruned.graph.output[0] == model.graph.output[0]
