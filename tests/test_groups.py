"""Channel groups found by the analysis, one topology per test."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxprune
import tiny
from onnxprune.flops import count_macs, count_params
from surgery import analysis_of, input_shape, prune_players
from tiny import Builder


def _groups(model):
    _, analysis = analysis_of(model)
    return {g.name: g for g in analysis.groups}, analysis


def test_plain_chain_one_group_per_layer_and_output_blocked():
    groups, _ = _groups(tiny.plain_cnn())
    sizes = {name: (g.size, g.prunable) for name, g in groups.items()}
    assert sizes == {"input": (3, False), "Conv4": (8, True), "Conv16": (16, True),
                     "Gemm32": (32, True), "Gemm38": (10, False)}
    assert any("graph output" in r for r in groups["Gemm38"].reasons)


def test_residual_add_couples_producers_and_depthwise_passes_through():
    groups, _ = _groups(tiny.residual_cnn())
    coupled = [g for g in groups.values() if len(g.producers) > 1]
    assert sorted(sorted(g.producers) for g in coupled) == [["Conv16", "Conv4"], ["Conv30", "Conv34"]]
    # the depthwise conv makes no group of its own: its channels are the block's
    assert not any("Conv42" in g.producers for g in groups.values())


def test_depthwise_group_count_follows_pruning():
    model = tiny.residual_cnn()
    groups, _ = _groups(model)
    g = next(g for g in groups.values() if "Conv34" in g.producers)
    pruned = prune_players(model, {g.index: [0, 3, 5]})
    dw = next(n for n in pruned.graph.node if n.name == "Conv42")
    assert next(a.i for a in dw.attribute if a.name == "group") == 13


def test_flatten_into_gemm_maps_each_channel_to_its_pixels():
    model = tiny.plain_cnn()
    groups, _ = _groups(model)
    pruned = prune_players(model, {groups["Conv16"].index: [1, 2]})
    gemm = {i.name: i for i in pruned.graph.initializer}
    shapes = sorted(tuple(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2)
    assert (32, 14 * 16) in shapes  # 16 channels x 4x4 pixels, two channels gone
    assert gemm


def test_concat_places_inputs_at_offsets():
    groups, _ = _groups(tiny.concat_cnn())
    # the branch convs stay separate groups; the skip input of the concat joins the Add group
    assert groups["Conv10"].prunable and groups["Conv10"].size == 6
    assert groups["Conv16"].prunable and groups["Conv16"].size == 10


def _softmax_over_channels():
    b = Builder()
    x = b.relu(b.conv("input", 3, 8))
    x = b.node("Softmax", [x], axis=1)
    return b.model(b.conv(x, 8, 4))


def test_channel_mixing_blocks_with_reason():
    groups, _ = _groups(_softmax_over_channels())
    g = groups["Conv4"]
    assert not g.prunable
    assert any("Softmax" in r and "mixes channels" in r for r in g.reasons)


def test_unknown_op_blocks_and_says_which():
    b = Builder()
    x = b.relu(b.conv("input", 3, 8))
    x = b.node("DepthToSpace", [x], blocksize=2)
    groups, _ = _groups(b.model(b.conv(x, 2, 4)))
    assert not groups["Conv4"].prunable
    assert any("DepthToSpace" in r for r in groups["Conv4"].reasons)


def test_ignore_leaves_a_layer_whole():
    model = tiny.plain_cnn()
    from onnxprune.analyse import analyse
    from onnxprune.load import default_opset
    import onnx_graphsurgeon as gs
    prepared, analysis = analysis_of(model)
    ignored = analyse(gs.import_onnx(prepared), analysis.shapes, default_opset(prepared), ignore=["Conv16"])
    by_name = {g.name: g for g in ignored.groups}
    assert not by_name["Conv16"].prunable and any("--ignore" in r for r in by_name["Conv16"].reasons)


def test_macs_counted_by_hand():
    # conv 3->8 and 8->16 at 8x8 with 3x3 kernels, then Gemm 256->32 and 32->10
    expected = 8 * 3 * 9 * 64 + 16 * 8 * 9 * 64 + 256 * 32 + 32 * 10
    model = tiny.plain_cnn()
    assert count_macs(model, {"input": input_shape(model)}) == expected


def test_macs_of_depthwise_and_strided_convs():
    b = Builder(channels=4, size=8)
    x = b.conv("input", 4, 4, group=4)  # depthwise: 4 * 9 * 64
    x = b.conv(x, 4, 6, k=1, stride=2)  # 6 * 4 * 16
    model = b.model(b.node("GlobalAveragePool", [x]))
    assert count_macs(model, {"input": (1, 4, 8, 8)}) == 4 * 9 * 64 + 6 * 4 * 16


# -- regressions the corpus found -------------------------------------------------------------

def test_macs_are_counted_on_weights_in_constant_nodes():
    # Paddle-style files hold their weights in Constant nodes: the count read them as
    # unknown (0 MACs), and every prune ended in "the pruned model has more FLOPs than
    # the original" (DenseNet, RegNet, MTCNN P-Net of the corpus)
    model = tiny.constant_node_cnn()
    shape = {"input": (1, 3, 8, 8)}
    assert count_macs(model, shape) == count_macs(tiny.plain_cnn(), shape) > 0
    # and their parameters: the report said "parameters 0 -> 15k" for the corpus DenseNet
    assert count_params(model) == count_params(tiny.plain_cnn()) > 0
    result = onnxprune.prune(model, np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32),
                             onnxprune.PruneOptions(flops=0.3, latency=False, round_to=1))
    assert 0.29 <= result.report.flops_reduction < 0.4


def _shuffle_after_computed_reshape() -> onnx.ModelProto:
    """conv 3->8, a torchvision-style channel shuffle whose reshape targets are computed
    from Shape -> Gather -> Div -> Cast -> Unsqueeze -> Concat (as torch exports
    ``x.view(b, g, c // g, h, w)``), then conv 8->16 and a global pool."""
    b = tiny.Builder(channels=3, size=8)

    def i64(value):
        name = f"const{len(b.inits)}"
        b.inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
        return name

    x = b.conv("input", 3, 8)
    shape = b.node("Shape", [x])

    def dim(i):
        return b.node("Gather", [shape, i64(i)], axis=0)

    def unsq(t):
        return b.node("Unsqueeze", [t, i64([0])])

    n, c, h, w = dim(0), dim(1), dim(2), dim(3)
    per_group = b.node("Cast", [b.node("Div", [c, i64(2)])], to=TensorProto.INT64)
    five = b.node("Concat", [unsq(n), i64([2]), unsq(per_group), unsq(h), unsq(w)], axis=0)
    y = b.node("Transpose", [b.node("Reshape", [x, five])], perm=[0, 2, 1, 3, 4])
    y = b.node("Reshape", [y, b.node("Concat", [unsq(n), unsq(c), unsq(h), unsq(w)], axis=0)])
    y = b.conv(y, 8, 16)
    return b.model(b.node("GlobalAveragePool", [y]), ["N", 16, 1, 1])


def test_shapes_behind_a_reshape_with_a_computed_target_are_known():
    # onnx's shape inference cannot follow the Div: every tensor after ShuffleNetV2's first
    # channel shuffle had an unknown shape, so its convs counted 0 MACs (the corpus
    # ShuffleNetV2 was counted at 0.42 of its 1.02 MMACs, and FLOPs targets were wrong)
    model = _shuffle_after_computed_reshape()
    assert count_macs(model, {"input": (1, 3, 8, 8)}) == 8 * 3 * 9 * 64 + 16 * 8 * 9 * 64
    _, analysis = analysis_of(model)
    assert analysis.macs() == 8 * 3 * 9 * 64 + 16 * 8 * 9 * 64
# -- channel shuffle, Split and Slice ----------------------------------------------------------

def _players(analysis, tensor):
    """The player of every channel of a tensor."""
    return analysis.atom_player[analysis.cmap[tensor]].tolist()


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _ints(model, name):
    from onnx import numpy_helper
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[name].tolist()


def test_shuffle_permutes_channels_and_ties_channel_j_of_every_part():
    model = tiny.shufflenet_v2()
    groups, analysis = _groups(model)
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    shuffled = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[0].startswith("transpose"))
    before, after = _players(analysis, cat.output[0]), _players(analysis, shuffled.output[0])
    # output channel j*2 + i is input channel i*4 + j, and channel j of both halves is one player
    assert after == [before[i * 4 + j] for j in range(4) for i in range(2)]
    assert before[:4] == before[4:]
    trunk = groups["Conv4 (+2 coupled)"]
    assert trunk.prunable and trunk.size == 8  # 4 tied pairs + the 4 channels the first branch reads
    assert all(g.prunable for name, g in groups.items() if name not in ("input", "Gemm157"))


def test_shuffle_rewrite_spells_the_kept_count_per_part():
    model = tiny.shufflenet_v2()
    groups, _ = _groups(model)
    pruned = prune_players(model, {groups["Conv4 (+2 coupled)"].index: [0, 3, 6],
                                   groups["Conv115 (+1 coupled)"].index: [1, 2]})
    targets = [_ints(pruned, n.input[1]) for n in pruned.graph.node if n.op_type == "Reshape"]
    # 0 and -1 batch entries stay; C/g and C follow the kept channels (2 of 4 per part, 6 of 8)
    assert targets == [[0, 2, 2, 8, 8], [0, 4, 8, 8], [-1, 2, 2, 64], [-1, 4, 8, 8], [0, 2, 6, 4, 4], [0, 12, 4, 4]]


def test_grouped_convs_and_shuffle_tie_channels_across_groups():
    groups, analysis = _groups(tiny.shufflenet_v1())
    # 16 channels, 2 groups: 8 per group, tied by the shuffle and the next grouped conv to
    # 16 / 2 / 2 = 4 players; with 4 groups of 4 everything is one player
    assert groups["Conv10"].size == 4 and groups["Conv54"].size == 1


def _shuffle_variant(perm=(0, 2, 1, 3, 4), back=(0, 8, 8, 8), run_time_target=False, also_read=False):
    b = Builder()
    x = b.relu(b.conv("input", 3, 8))
    if run_time_target:
        batch = b.node("Gather", [b.node("Shape", [x]), b.ints([0])], axis=0)
        shape = b.node("Concat", [batch, b.ints([2, 4, 8, 8])], axis=0)
    else:
        shape = b.ints([0, 2, 4, 8, 8])
    y = b.node("Reshape", [x, shape])
    z = b.node("Transpose", [y], perm=list(perm))
    z = b.node("Reshape", [z, b.ints(list(back))])
    if also_read:
        z = b.node("Add", [z, b.node("Reshape", [y, b.ints([0, 8, 8, 8])])])
    if len(back) == 4:
        z = b.conv(z, 8, 4)
    return b.model(b.node("ReduceMean", [z], axes=[1] if len(back) == 3 else [2, 3], keepdims=1))


def test_shuffle_whose_batch_entry_is_read_with_shape_is_followed():
    # torch writes x.view(x.size(0), g, c // g, h, w): prepare turns the copied batch entry
    # into 0 ("copy this dimension"), the target folds, and the shuffle is followed
    groups, _ = _groups(_shuffle_variant(run_time_target=True))
    assert groups["Conv4"].prunable and groups["Conv4"].size == 4


@pytest.mark.parametrize("kind,reason", [
    ("perm", "has perm [0, 1, 3, 4, 2], not [0, 2, 1, 3, 4]"),
    ("back", "does not make the channel axis whole again"),
    ("also_read", "not read by one Transpose only"),
])
def test_reshape_that_is_not_a_channel_shuffle_blocks_with_reason(kind, reason):
    model = _shuffle_variant(perm=(0, 1, 3, 4, 2) if kind == "perm" else (0, 2, 1, 3, 4),
                             back=(0, 2, 256) if kind == "back" else (0, 8, 8, 8),
                             run_time_target=kind == "run_time", also_read=kind == "also_read")
    groups, _ = _groups(model)
    g = groups["Conv4"]
    assert not g.prunable
    assert any(reason in r for r in g.reasons), g.reasons
    assert any("splits the 8 channels into 2 x 4, but this is no channel shuffle" in r for r in g.reasons)


def test_transpose_keeping_the_channel_axis_passes_channels_through():
    b = Builder()
    x = b.relu(b.conv("input", 3, 8))
    x = b.node("Transpose", [x], perm=[0, 1, 3, 2])
    groups, _ = _groups(b.model(b.conv(x, 8, 4)))
    assert groups["Conv4"].prunable
    b = Builder()
    x = b.node("Transpose", [b.relu(b.conv("input", 3, 8))], perm=[0, 2, 3, 1])
    groups, _ = _groups(b.model(b.node("ReduceMean", [x], axes=[3], keepdims=1)))
    assert not groups["Conv4"].prunable and any("moves the channel axis" in r for r in groups["Conv4"].reasons)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_gives_each_output_its_channels_and_writes_kept_sizes(opset):
    model = tiny.yolo_c2f(opset=opset)
    groups, analysis = _groups(model)
    cv1 = groups["Conv10 (+1 coupled)"]  # the C2f's first conv, tied to its bottleneck's residual
    assert cv1.prunable and cv1.size == 8
    split = next(n for n in model.graph.node if n.op_type == "Split")
    whole = _players(analysis, split.input[0])
    h = 5 if opset < 18 else 4
    assert _players(analysis, split.output[0]) == whole[:8 - h]
    assert _players(analysis, split.output[1]) == whole[8 - h:]
    pruned = prune_players(model, {cv1.index: [0, 6]})
    split = _node(pruned, split.name)
    sizes = ([a.ints for a in split.attribute if a.name == "split"][0] if opset < 13 else _ints(pruned, split.input[1]))
    assert list(sizes) == ([2, 4] if opset < 18 else [3, 3])
    assert not any(a.name == "num_outputs" for a in split.attribute)


def test_split_on_another_axis_and_resize_pass_channels_through():
    model = tiny.yolo_c2f()
    groups, analysis = _groups(model)
    halves = next(n for n in model.graph.node if n.op_type == "Split" and n.attribute[0].i == 2)
    whole = _players(analysis, halves.input[0])
    assert _players(analysis, halves.output[0]) == _players(analysis, halves.output[1]) == whole
    assert groups["Conv42"].prunable  # upsampled by Resize, then concatenated


def test_equal_split_into_chunks_of_opset_18():
    from surgery import kill_players, outputs, rel_error, sample
    b = Builder(opset=18)
    x = b.relu(b.conv("input", 3, 10))
    parts = b.split(x, [0] * 4, equal=True)  # chunks of ceil(10 / 4): 3, 3, 3 and 1
    x = b.node("Concat", [b.conv(p, n, 2) for p, n in zip(parts, [3, 3, 3, 1])], axis=1)
    model = b.model(b.node("GlobalAveragePool", [x]))
    groups, analysis = _groups(model)
    assert groups["Conv4"].prunable and len(analysis.regions) == 4
    drop = {groups["Conv4"].index: [0, 2, 4, 6, 8]}
    killed = kill_players(model, drop)
    pruned = prune_players(killed, drop)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    assert _ints(pruned, split.input[1]) == [1, 2, 1, 1]  # channels 1 | 3 5 | 7 | 9 kept
    x = sample(model)
    assert rel_error(outputs(killed, x), outputs(pruned, x)) < 1e-6


def test_slice_carries_its_range_and_recomputes_bounds():
    model = tiny.slices_cnn()
    groups, analysis = _groups(model)
    whole = _players(analysis, model.graph.node[0].output[0])
    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    assert [_players(analysis, s.output[0]) for s in slices] == [whole[2:7], whole[7:11], whole[9:12]]
    pruned = prune_players(model, {groups["Conv4"].index: [0, 3, 5, 8, 11]})
    bounds = [(_ints(pruned, s.input[1]), _ints(pruned, s.input[2])) for s in (_node(pruned, n.name) for n in slices)]
    # kept 1 2 4 6 7 9 10: forms kept (from the start, from the end, open-ended)
    assert bounds == [([1], [4]), ([-3], [7]), ([0, -2, 0, 0], [tiny.INT64_MAX, 99, tiny.INT64_MAX, tiny.INT64_MAX])]


@pytest.mark.parametrize("bounds,reason", [
    (dict(starts=[0], ends=[8], axes=[1], steps=[2]), "step 2"),
    (dict(starts=[5], ends=[-4], axes=[1]), "Slice of no channels"),
])
def test_channel_slice_that_cannot_be_followed_blocks(bounds, reason):
    b = Builder()
    x = b.relu(b.conv("input", 3, 8))
    x = b.slice(x, **bounds)
    groups, _ = _groups(b.model(b.node("ReduceMean", [x], axes=[2, 3], keepdims=1)))
    assert not groups["Conv4"].prunable and any(reason in r for r in groups["Conv4"].reasons)


def test_allocation_never_empties_a_split_or_slice():
    from onnxprune.allocate import allocate
    model = tiny.slices_cnn()
    _, analysis = analysis_of(model)
    ranked = {g.index: np.flatnonzero(analysis.player_group == g.index)[::-1] for g in analysis.prunable_groups()}
    alloc = allocate(analysis, ranked, 0.5, 0.0, 1, "uniform")
    kept_atom = alloc.keep_player[analysis.atom_player]
    assert all(kept_atom[r].any() for r in analysis.regions)


def test_chunk_as_pytorch_exports_it_folds_and_is_followed():
    """torch.onnx exports x.chunk(2, 1) as Slices whose bounds come from Shape(x)[1]
    ((C + 1) / 2 and twice that); the channel axis is static, so prepare folds them into
    constants, also with a dynamic batch, and the Slices are followed."""
    b = Builder(channels=3, size=8, batch="N")
    x = b.relu(b.conv("input", 3, 8))
    c = b.node("Gather", [b.node("Shape", [x]), b.ints([1])], axis=0)
    half = b.node("Mul", [b.node("Div", [b.node("Add", [c, b.ints([1])]), b.ints([2])]), b.ints([1])])
    left = b.node("Slice", [x, b.ints([0]), half, b.ints([1])])
    right = b.node("Slice", [x, half, b.node("Mul", [half, b.ints([2])]), b.ints([1])])
    y = b.node("Concat", [left, b.relu(b.conv(right, 4, 4))], axis=1)
    model = b.model(b.node("GlobalAveragePool", [b.conv(y, 8, 4)]))
    prepared, analysis = analysis_of(model)
    assert not any(n.op_type == "Shape" for n in prepared.graph.node)
    assert {g.name: g.prunable for g in analysis.groups}["Conv4"]
