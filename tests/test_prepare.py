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
