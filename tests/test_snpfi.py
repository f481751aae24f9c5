"""The interaction criterion: closed-form Shapley values against brute force."""

import itertools
import math

import numpy as np

from onnxprune.calibrate import TensorStats, ChannelStats
from onnxprune.snpfi import loss_curve, group_games
from surgery import analysis_of, outputs
from tiny import Builder


def _two_layer(seed=0):
    """conv3x3 (3->6) - relu - conv1x1 (6->4): the 1x1 consumer makes the local payoff exact."""
    b = Builder(seed=seed)
    x = b.relu(b.conv("input", 3, 6))
    return b.model(b.node("Relu", [b.conv(x, 6, 4, k=1)]))


def _brute_shapley(value, n):
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            for coalition in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                phi[i] += weight * (value(set(coalition) | {i}) - value(set(coalition)))
    return phi


def test_shapley_values_match_brute_force_on_measured_payoff():
    model = _two_layer()
    _, analysis = analysis_of(model)
    group = next(g for g in analysis.groups if g.prunable)
    relu_out = next(n.outputs[0].name for n in analysis.graph.nodes if n.op == "Relu")
    consumer = next(n for n in analysis.graph.nodes if n.op == "Conv" and n.inputs[0].name == relu_out)
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    from onnxprune.runtime import expose
    (act,) = outputs(expose(model, [relu_out]), x)[1:]
    stats = ChannelStats({relu_out: TensorStats()})
    stats[relu_out].add(act)
    game = group_games(analysis, stats)[group.index]

    w = consumer.inputs[1].values[:, :, 0, 0].astype(np.float64)
    a = act.astype(np.float64)
    mu = a.mean(axis=(0, 2, 3))

    def value(coalition):
        masked = a.copy()
        for c in range(6):
            if c not in coalition:
                masked[:, c] = mu[c]
        diff = np.einsum("oc,nchw->nohw", w, a - masked)
        return -float((diff ** 2).sum(axis=1).mean(axis=(0, 1, 2)) * 64)  # per sample, 8x8 pixels

    brute = _brute_shapley(value, 6)
    # the criterion is in units of the consumer's output variance: compare up to that scale
    scale = brute.sum() / game.shapley.sum()
    np.testing.assert_allclose(game.shapley * scale, brute, rtol=1e-6, atol=1e-9 * abs(brute).max())
    # and the payoff of keeping everything except the least important channel
    worst = int(game.order[-1])
    kept = set(range(6)) - {worst}
    assert math.isclose(-game.loss[5] * scale, value(kept), rel_tol=1e-6)


def test_loss_curve_removes_least_important_first():
    rng = np.random.default_rng(3)
    m = rng.normal(size=(5, 5))
    q = m @ m.T
    order = np.argsort(-q.sum(axis=1))
    loss = loss_curve(q, order)
    assert loss[5] == 0 and math.isclose(loss[0], q.sum())
    for k in range(6):
        removed = order[k:]
        assert math.isclose(loss[k], q[np.ix_(removed, removed)].sum(), rel_tol=1e-9, abs_tol=1e-12)


def test_refit_payoff_drops_channels_the_others_reproduce_first():
    """Channel 7 copies channel 0 and channel 6 is twice channel 1: once the next layer is
    refitted, one of each pair can go at no cost, so those go first."""
    from onnxprune.runtime import expose
    from onnxprune.snpfi import refit_games
    from test_recover import _redundant_model

    model = _redundant_model()
    _, analysis = analysis_of(model)
    group = next(g for g in analysis.groups if g.prunable and g.size == 8 and g.name.startswith("Conv"))
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    names = {c.tensor for c in __import__("onnxprune.consumers", fromlist=["x"]).find_consumers(analysis)}
    acts = outputs(expose(model, sorted(names)), x)[1:]
    stats = ChannelStats({n: TensorStats() for n in sorted(names)})
    for n, a in zip(sorted(names), acts):
        stats[n].add(a)
    games = refit_games(analysis, stats, group_games(analysis, stats))
    game = games[group.index]
    first_two = {int(i) for i in game.order[-2:]}
    assert len(first_two & {0, 7}) == 1 and len(first_two & {1, 6}) == 1
    assert game.loss[6] < 1e-6 < game.loss[5]
