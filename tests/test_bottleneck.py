"""The learned bottleneck: soft FLOPs and their gradient, gates meeting the target, the threshold
allocation, and a real model pruned by it end to end."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.allocate import MacModel, allocate
from onnxprune.api import load_labelled
from onnxprune.bottleneck import GateSettings, SoftFlops, learn_gates
from onnxprune.calibrate import ChannelStats, TensorStats
from onnxprune.cli import run
from onnxprune.consumers import find_consumers
from onnxprune.flops import count_macs
from onnxprune.runtime import expose
from onnxprune.snpfi import group_games
from surgery import analysis_of, outputs
from tiny import concat_cnn, residual_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soft_flops_equal_counted_flops_at_binary_gates_and_gradient_matches_finite_differences():
    _, analysis = analysis_of(concat_cnn())
    model = MacModel(analysis)
    soft = SoftFlops(model)
    rng = np.random.default_rng(0)
    keep = rng.random(analysis.num_players) > 0.4
    value, _ = soft.value_and_grad(keep.astype(np.float64))
    assert round(value) == model.macs(keep)
    assert soft.full == model.macs(np.ones(analysis.num_players, dtype=bool))
    lam = rng.uniform(0.2, 0.9, analysis.num_players)
    _, grad = soft.value_and_grad(lam)
    for p in rng.choice(analysis.num_players, 6, replace=False):
        step = np.zeros_like(lam)
        step[p] = 1e-4
        numeric = (soft.value_and_grad(lam + step)[0] - soft.value_and_grad(lam - step)[0]) / 2e-4
        np.testing.assert_allclose(grad[p], numeric, rtol=1e-6, atol=1e-6 * soft.full)


def _games(model, seed=0):
    prepared, analysis = analysis_of(model)
    tensors = sorted({c.tensor for c in find_consumers(analysis)})
    x = np.random.default_rng(seed).normal(size=(32,) + tuple(
        d.dim_value for d in prepared.graph.input[0].type.tensor_type.shape.dim[1:])).astype(np.float32)
    acts = outputs(expose(prepared, tensors), x)[1:]
    stats = ChannelStats({t: TensorStats() for t in tensors})
    for t, a in zip(tensors, acts):
        stats[t].add(a)
    return analysis, group_games(analysis, stats)


def test_gates_reach_the_soft_flops_target_and_binarise():
    analysis, games = _games(residual_cnn())
    result = learn_gates(analysis, games, 0.5, GateSettings(steps=1500))
    assert abs(result.soft_flops_ratio - 0.5) < 0.03
    assert result.binary_share > 0.8
    assert set(result.gates) == set(games)


def test_gates_close_the_channels_the_payoff_says_are_worthless():
    """A channel whose interactions are all zero costs nothing to remove: take the most open
    gate of the group the gates prune hardest, make that channel worthless, and its gate closes."""
    analysis, games = _games(residual_cnn())
    before = learn_gates(analysis, games, 0.6)
    g = min(before.gates, key=lambda k: np.median(before.gates[k]))
    j = int(np.argmax(before.gates[g]))
    assert before.gates[g][j] > 0.9
    games[g].q[j, :] = 0.0
    games[g].q[:, j] = 0.0
    after = learn_gates(analysis, games, 0.6)
    assert after.gates[g][j] < 0.1


def test_threshold_allocation_keeps_the_most_open_gates_and_meets_the_target():
    _, analysis = analysis_of(residual_cnn())
    rng = np.random.default_rng(1)
    ranked, gates = {}, {}
    for grp in analysis.prunable_groups():
        players = np.flatnonzero(analysis.player_group == grp.index)
        gates[grp.index] = rng.normal(size=len(players))
        ranked[grp.index] = players[np.argsort(-gates[grp.index], kind="stable")]
    alloc = allocate(analysis, ranked, 0.4, 0.1, 1, "threshold", gates=gates)
    assert alloc.macs_after <= alloc.target_macs
    assert alloc.reduction < 0.41
    for grp in analysis.prunable_groups():
        players = np.flatnonzero(analysis.player_group == grp.index)
        kept = alloc.keep_player[players]
        if kept.any() and (~kept).any():
            assert gates[grp.index][kept].min() >= gates[grp.index][~kept].max() - 1e-12 or alloc.kept[grp.index] <= 1


def test_cli_bottleneck_prunes_a_real_model_to_the_target(tmp_path, capsys):
    base = os.path.join(ROOT, "models", "mnist_cnn")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = run([base + ".onnx", str(out), "--calib", base + "_calib", "--flops", "0.5", "--method", "bottleneck",
                "--max-images", "96", "--no-latency", "--report", str(report), "--eval", base + "_test.npz"])
    assert code == 0
    text = capsys.readouterr().out
    assert "learned bottleneck" in text
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    shapes = {"input": (1, 1, 28, 28)}
    reduction = 1 - count_macs(pruned, shapes) / count_macs(onnx.load(base + ".onnx"), shapes)
    assert 0.5 <= reduction <= 0.51
    data = json.loads(report.read_text())
    assert data["method"] == "bottleneck" and data["gates"]["steps"] == 1000
    x, y = load_labelled(base + "_test.npz")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
    assert acc >= 0.98  # 99.4% before; recovery keeps it close
