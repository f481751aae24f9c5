"""Tensors read inside If branches (outer-scope names, in no node's input list) are seen by
every pass: their channels stay whole, and what the branches read stays in the model."""

import numpy as np
import onnx
import onnxprune
import pytest
from onnx import helper, numpy_helper

from surgery import analysis_of, outputs
from tiny import Builder


def _branching_model(axes_from_initializer: bool) -> onnx.ModelProto:
    """conv2's output is read by the next conv and, inside both branches of an If, reduced over
    its channels; conv2's filters 4..7 are dead (zero after the ReLU). ``axes_from_initializer``:
    the branches also read an initializer nothing else reads."""
    rng = np.random.default_rng(0)
    b = Builder(channels=3, size=8)
    x = b.relu(b.conv("input", 3, 8))
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    w2[4:] = 0
    b2 = np.full(8, 0.1, np.float32)
    b2[4:] = -1.0
    b.inits += [numpy_helper.from_array(w2, "wconv2"), numpy_helper.from_array(b2, "bconv2")]
    b.nodes.append(helper.make_node("Conv", [x, "wconv2", "bconv2"], ["c2"], name="conv2", kernel_shape=[3, 3],
                                    pads=[1, 1, 1, 1]))
    r2 = b.relu("c2")
    logits = b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [b.relu(b.conv(r2, 8, 8))])], axis=1), 8, 5)
    cond = b.node("Greater", [b.node("ReduceMax", ["input"], keepdims=0), b.init(np.array(-1.0), "thr")])
    if axes_from_initializer:
        b.inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))

    def branch(name, op):
        if axes_from_initializer:
            nodes = [helper.make_node(op, [r2], [name + "_r"], axes=[1, 2, 3], keepdims=0),
                     helper.make_node("Unsqueeze", [name + "_r", "one"], [name])]
        else:
            nodes = [helper.make_node(op, [r2], [name + "_r"], axes=[1, 2, 3], keepdims=1),
                     helper.make_node("Flatten", [name + "_r"], [name], axis=1)]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(name, 1, None)])

    b.nodes.append(helper.make_node("If", [cond], ["if_out"], name="branch",
                                    then_branch=branch("t_out", "ReduceMean"), else_branch=branch("e_out", "ReduceMax")))
    out = b.node("Add", [logits, "if_out"])
    graph = helper.make_graph(b.nodes, "g", [b.input], [helper.make_tensor_value_info(out, 1, ["N", 5])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_channels_read_inside_a_branch_are_left_whole():
    _, analysis = analysis_of(_branching_model(False))
    (group,) = [g for g in analysis.groups if "conv2" in g.producers]
    assert not group.prunable
    assert any("read inside a subgraph of If" in r for r in group.reasons)


@pytest.mark.parametrize("recover", [False, True])
@pytest.mark.parametrize("axes_from_initializer", [False, True])
def test_a_model_with_branches_prunes_elsewhere_and_stays_valid(recover, axes_from_initializer):
    model = _branching_model(axes_from_initializer)
    xs = np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32)
    result = onnxprune.prune(model, xs, onnxprune.PruneOptions(flops=0.3, recover=recover, round_to=4, latency=False))
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert weights["wconv2"].shape[0] == 8  # its output is read inside the branches
    assert result.report.flops_reduction >= 0.3
    ref, out = outputs(model, xs)[0], outputs(pruned, xs)[0]
    assert np.linalg.norm(out - ref) < 0.1 * np.linalg.norm(ref)
