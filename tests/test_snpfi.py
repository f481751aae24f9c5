"""The interaction criterion: closed-form Shapley values against brute force, and the order
channels leave a group in."""

import itertools
import math

import numpy as np

from onnxprune.calibrate import TensorStats, ChannelStats
from onnxprune.snpfi import elimination_order, loss_curve, group_games
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


def test_each_elimination_step_removes_the_cheapest_channel_given_those_removed():
    rng = np.random.default_rng(7)
    m = rng.normal(size=(9, 9)) + 1.0  # correlated, as post-ReLU channels are
    q = m @ m.T
    order = elimination_order(q)
    assert sorted(order.tolist()) == list(range(9))
    removed = []
    for i in order[::-1]:
        alive = [j for j in range(9) if j not in removed]
        costs = {j: q[np.ix_(removed + [j], removed + [j])].sum() for j in alive}
        assert math.isclose(costs[int(i)], min(costs.values()), rel_tol=1e-9)
        removed.append(int(i))


def test_refit_payoff_costs_are_the_exact_error_left_after_refitting():
    """The elimination's running cost equals the error a least-squares refit on the channels
    left leaves, recomputed from scratch after every removal: through its steps of several
    channels, its steps of one and its compactions, for two consumers reading overlapping
    subsets of the group."""
    from onnxprune.snpfi import _eliminate

    rng = np.random.default_rng(3)
    n = 200  # steps of 3 channels at first, of one below 128
    m = rng.normal(size=(n, n + 40)) + 0.3  # correlated channels
    sigma = m @ m.T / (n + 40) + 1e-3 * np.eye(n)
    reads = [np.arange(n), np.arange(0, n, 3)]
    targets = [sigma[np.ix_(r, r)] @ rng.normal(size=(len(r), 5)) for r in reads]

    def explained(kept):
        total = 0.0
        for r, t in zip(reads, targets):
            k = np.flatnonzero(np.isin(r, kept))
            if len(k):
                total += float(np.trace(t[k].T @ np.linalg.solve(sigma[np.ix_(r[k], r[k])], t[k])))
        return total

    fits = [{"index": r.copy(), "p": np.linalg.inv(sigma[np.ix_(r, r)]),
             "b": np.linalg.inv(sigma[np.ix_(r, r)]) @ t, "energy": 1.0} for r, t in zip(reads, targets)]
    removed, costs = _eliminate(n, fits)
    assert sorted(removed) == list(range(n))
    full = explained(np.arange(n))
    running = np.cumsum(costs)
    # every step boundary: 3 channels at a time down to 128 left, then one at a time
    boundaries, live = [], n
    while live:
        live -= max(1, live // 64)
        boundaries.append(n - live)
    for done in boundaries[::7] + [boundaries[-2]]:
        kept = np.setdiff1d(np.arange(n), removed[:done])
        assert math.isclose(running[done - 1], full - explained(kept), rel_tol=1e-7, abs_tol=1e-9 * full)


def test_channels_that_cancel_leave_together_not_by_shapley_rank():
    """Channels 0 and 1 cancel in the consumer (their contributions are opposite); 2 and 3 are
    small and independent. Shapley values call 0 and 1 worthless (phi = 0), so ranking by them
    removes one of the pair first and loses its whole contribution; elimination removes the
    small ones first, and then the pair costs nothing more than keeping it."""
    q = np.array([[4.0, -4.0, 0, 0], [-4.0, 4.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.5]])
    order = elimination_order(q)
    loss = loss_curve(q, order)
    assert set(order[-2:].tolist()) == {2, 3}
    shapley_order = np.lexsort((np.arange(4), -q.sum(axis=1)))
    assert loss[3] < loss_curve(q, shapley_order)[3]  # one channel removed: 1.0 against 4.0


def test_without_recovery_a_real_model_keeps_its_accuracy_at_half_the_flops():
    """mnist_cnn at -50% with channels simply removed: ranked by Shapley value it kept 47% of
    the shipped test digits (64 calibration images); eliminated on the interactions, 98%."""
    import os
    import onnxprune
    from onnxprune.verify import accuracy

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    opts = onnxprune.PruneOptions(flops=0.5, recover=False, latency=False, max_images=64)
    result = onnxprune.prune(os.path.join(root, "mnist_cnn.onnx"), os.path.join(root, "mnist_cnn_calib"), opts)
    test = np.load(os.path.join(root, "mnist_cnn_test.npz"))
    assert abs(result.report.flops_reduction - 0.5) <= 0.01
    assert accuracy(result.model, test["x"], test["y"], ["CPUExecutionProvider"]) > 0.9


def test_filter_factor_reproduces_the_gram_whether_or_not_it_is_singular():
    """The refit payoff meets a consumer's weights through a factor L of F F^T: Cholesky where
    F F^T is positive definite, the eigendecomposition where it is not (fewer weights per
    channel than channels, or duplicate channels)."""
    from onnxprune.snpfi import filter_factor

    rng = np.random.default_rng(5)
    for f in (rng.normal(size=(12, 40)), rng.normal(size=(12, 5))):  # full rank, rank 5
        gram = f @ f.T
        factor = filter_factor(gram)
        assert factor.shape == (12, 12)
        np.testing.assert_allclose(factor @ factor.T, gram, atol=1e-10 * np.abs(gram).max())


def test_channels_read_by_a_grouped_conv_are_scored_by_what_they_feed():
    # conv1's channels 1, 5, 9 and 13 are dead (zero after the ReLU) and only a grouped conv
    # (2 groups) reads them: the payoff must see that they feed nothing, so a small target
    # removes exactly those (they were unscored and cut from the end of the group as if free)
    import onnxprune
    from onnx import numpy_helper

    b = Builder(channels=3, size=8, seed=2)
    x = b.relu(b.conv("input", 3, 16))
    w = numpy_helper.to_array(b.inits[0]).copy()
    bias = numpy_helper.to_array(b.inits[1]).copy()
    dead = [1, 5, 9, 13]
    w[dead], bias[dead] = 0.0, -1.0
    b.inits[0] = numpy_helper.from_array(w, b.inits[0].name)
    b.inits[1] = numpy_helper.from_array(bias, b.inits[1].name)
    model = b.model(b.conv(x, 16, 16, group=2), ["N", 16, 8, 8])  # conv1's group is the only prunable one
    xs = np.random.default_rng(0).random((48, 3, 8, 8), dtype=np.float32)
    opts = onnxprune.PruneOptions(flops=0.05, recover=False, round_to=1, min_keep=0.0, latency=False)
    result = onnxprune.prune(model, xs, opts)
    assert result.report.flops_reduction >= 0.05
    ref, out = outputs(model, xs)[0], outputs(result.model, xs)[0]
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()
