"""The baseline criteria: bn-scale ranks by the folded BatchNormalization's |gamma|."""

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.prepare import prepare
from onnxprune.score import score_players
from surgery import analysis_of
from tiny import residual_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "models", "mnist_cnn.onnx")  # exported with BatchNormalization unfolded


def test_bn_scale_scores_are_the_gammas_of_the_folded_batchnorms():
    model = onnx.load(MNIST)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gammas = [np.abs(inits[n.input[1]]) for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert gammas
    _, log = prepare(model)
    _, analysis = analysis_of(model)
    scores = score_players(analysis, "bn-scale", bn_scale=log.bn_scale)
    group_scores = [np.sort(scores[analysis.player_group == g.index]) for g in analysis.prunable_groups()]
    for gamma in gammas:
        assert any(len(s) == len(gamma) and np.allclose(s, np.sort(gamma)) for s in group_scores)


def test_bn_scale_prunes_a_real_model_to_the_target():
    x = np.load(os.path.join(ROOT, "models", "mnist_cnn_test.npz"))["x"][:40]
    result = onnxprune.prune(MNIST, x, onnxprune.PruneOptions(flops=0.4, criterion="bn-scale", recover=False,
                                                              latency=False, round_to=1))
    assert result.report.criterion == "bn-scale"
    assert 0.4 <= result.report.flops_reduction <= 0.41


def test_bn_scale_refuses_a_model_without_batchnorm(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(onnxprune.UsageError, match="bn-scale needs BatchNormalization"):
        onnxprune.prune(residual_cnn(), x, onnxprune.PruneOptions(flops=0.3, criterion="bn-scale", latency=False))


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_filter_norms_of_grouped_convs_fold_onto_their_tied_channels(criterion):
    # a depthwise conv with a channel multiplier (groups 8, 16 outputs) then a grouped conv:
    # a grouped conv's output j is player j % (outputs / groups), so its filters' norms are
    # summed over the groups (they overflowed the players' array before)
    from tiny import Builder

    b = Builder(channels=3, size=8)
    x = b.relu(b.conv("input", 3, 32))
    x = b.relu(b.conv(x, 32, 64, group=32))
    x = b.relu(b.conv(x, 64, 32, k=1, group=4))
    model = b.model(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), 32, 5), ["N", 5])
    _, analysis = analysis_of(model)
    scores = score_players(analysis, criterion)
    prunable = np.isin(analysis.player_group, [g.index for g in analysis.prunable_groups()])
    assert np.isfinite(scores).all() and (scores[prunable] > 0).all()
    xs = np.random.default_rng(0).random((32, 3, 8, 8), dtype=np.float32)
    result = onnxprune.prune(model, xs, onnxprune.PruneOptions(flops=0.3, criterion=criterion, latency=False))
    assert result.report.flops_reduction >= 0.3
