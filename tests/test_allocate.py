"""Allocation: the FLOPs target is met exactly as counted, with rounding, floors and curves."""

import numpy as np
import pytest

import tiny
from onnxprune.allocate import MacModel, allocate, allowed_counts
from onnxprune.errors import TargetError
from surgery import analysis_of

MODELS = {"plain": tiny.plain_cnn, "residual": tiny.residual_cnn, "concat": tiny.concat_cnn}


def _ranked(analysis):
    return {g.index: np.flatnonzero(analysis.player_group == g.index) for g in analysis.prunable_groups()}


def _random_curves(ranked, rng):
    """Per group, a falling loss curve of random steps and scale (loss[n] = 0)."""
    return {g: np.concatenate([np.sort(rng.random(len(p)))[::-1] * rng.uniform(0.1, 3), [0.0]])
            for g, p in ranked.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_incremental_mac_model_equals_full_count(name):
    _, analysis = analysis_of(MODELS[name]())
    model = MacModel(analysis)
    rng = np.random.default_rng(0)
    for _ in range(20):
        keep = rng.random(analysis.num_players) < 0.6
        keep |= ~np.array([analysis.groups[g].prunable for g in analysis.player_group])
        assert model.macs(keep) == analysis.macs(keep)


@pytest.mark.parametrize("mode", ["uniform", "auto"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_target_met_within_one_point(name, mode):
    _, analysis = analysis_of(MODELS[name]())
    ranked = _ranked(analysis)
    loss = {g: np.linspace(1, 0, len(p) + 1) ** 2 for g, p in ranked.items()}
    for ratio in (0.2, 0.4, 0.6):
        a = allocate(analysis, ranked, ratio, 0.1, 1, mode, loss)
        assert a.macs_after == analysis.macs(a.keep_player)
        # tiny groups prune in coarse steps (one channel can be 10% of the FLOPs): the
        # reduction is never short of the target and close past it; real models land
        # within one point (test_cli)
        assert ratio <= a.reduction <= ratio + 0.03


def test_round_to_and_min_keep_are_honoured():
    _, analysis = analysis_of(tiny.residual_cnn())
    ranked = _ranked(analysis)
    a = allocate(analysis, ranked, 0.5, 0.25, 4, "uniform")
    for g, k in a.kept.items():
        n = len(ranked[g])
        assert k % 4 == 0 or k == n
        assert k >= 0.25 * n


def test_auto_prunes_where_the_curve_says_it_costs_nothing():
    _, analysis = analysis_of(tiny.plain_cnn())
    ranked = _ranked(analysis)
    groups = sorted(ranked)
    free = groups[1]  # the 16-channel conv: removing its channels costs no payoff
    loss = {g: (np.zeros(len(p) + 1) if g == free else np.linspace(1, 0, len(p) + 1)) for g, p in ranked.items()}
    a = allocate(analysis, ranked, 0.3, 0.1, 1, "auto", loss)
    share = {g: a.kept[g] / len(ranked[g]) for g in groups}
    assert share[free] < min(share[g] for g in groups if g != free)


def test_unreachable_target_says_the_most():
    _, analysis = analysis_of(tiny.plain_cnn())
    with pytest.raises(TargetError, match=r"at most \d+\.\d%"):
        allocate(analysis, _ranked(analysis), 0.97, 0.5, 1, "uniform")


def test_allowed_counts_are_multiples_and_the_whole_group():
    assert allowed_counts(64, 16).tolist() == [16, 32, 48, 64]
    assert allowed_counts(24, 16).tolist() == [16, 24]  # the whole group is always allowed
    assert allowed_counts(12, 16).tolist() == list(range(1, 13))  # narrower than a block: any count
    assert allowed_counts(32, 8).tolist() == [8, 16, 24, 32]
    assert allowed_counts(5, 1).tolist() == [1, 2, 3, 4, 5]
    # the narrow unit in groups under two blocks: a 16-channel group can be halved
    assert allowed_counts(16, 16, 8).tolist() == [8, 16]
    assert allowed_counts(24, 16, 8).tolist() == [8, 16, 24]
    assert allowed_counts(32, 16, 8).tolist() == [16, 32]


def test_default_rounding_is_the_cpu_kernels_block(monkeypatch):
    from onnxprune import runtime
    monkeypatch.setattr(runtime, "_cpu_has_avx512", lambda: True)
    assert runtime.kernel_channel_block(["CPUExecutionProvider"]) == (16, 8)
    assert runtime.kernel_channel_block(["CUDAExecutionProvider", "CPUExecutionProvider"]) == (8, 0)
    monkeypatch.setattr(runtime, "_cpu_has_avx512", lambda: False)
    assert runtime.kernel_channel_block(["CPUExecutionProvider"]) == (8, 0)


def test_gap_closing_trades_the_steps_that_lose_least_payoff():
    # Coarse steps make the greedy overshoot the target by more than a point; of the trades of
    # single steps (one group up, another down) that land within the point, the allocation
    # must not take one that loses more payoff than another would. It used to take the trade
    # landing closest to the target whatever it cost.
    from itertools import permutations

    from onnxprune.allocate import _give_back, _greedy, _Planner, essentials_first

    _, analysis = analysis_of(tiny.residual_cnn())
    ranked = _ranked(analysis)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        loss = _random_curves(ranked, rng)
        ratio = float(rng.uniform(0.2, 0.6))
        a = allocate(analysis, ranked, ratio, 0.1, 2, "auto", loss)
        ordered, essential = essentials_first(analysis, ranked)
        plan = _Planner(analysis, ordered, 0.1, 2, essential)
        tolerance = int(np.floor(a.macs_before * 0.01))
        greedy = _give_back(plan, _greedy(plan, a.target_macs, loss), a.target_macs, loss)
        if a.target_macs - plan.macs(greedy) <= tolerance:
            continue  # the greedy landed within the point: no trade was made
        trades = []
        for up, down in permutations(greedy, 2):
            trial = dict(greedy)
            trial[up], trial[down] = plan.step_up(up, greedy[up]), plan.step_down(down, greedy[down])
            if trial[up] != greedy[up] and trial[down] != greedy[down] and \
                    a.target_macs - tolerance <= plan.macs(trial) <= a.target_macs:
                trades.append(sum(loss[g][k] for g, k in trial.items()))
        if not trades:
            continue
        checked += 1
        assert a.target_macs - tolerance <= a.macs_after <= a.target_macs
        assert sum(loss[g][k] for g, k in a.kept.items()) <= min(trades) + 1e-12
    assert checked >= 5


def test_auto_lands_within_a_point_whenever_some_plan_does(monkeypatch):
    # Few coarse groups: a plan within the point can lie several steps of several groups away
    # from the greedy one, further than any trade looks. tiny.grouped_cnn at -40% without
    # recovery landed at -50% (kept 1, 2 and 6 of 2, 2 and 6 coupled players) while (2, 1, 3)
    # is exactly -40%. Every plan is checked here against the allocation's: where the greedy
    # and its trades miss the point (the search switched off), the allocation takes the plan
    # within it that loses least payoff.
    from itertools import product

    from onnxprune import allocate as allocate_module
    _, analysis = analysis_of(tiny.grouped_cnn())
    ranked = _ranked(analysis)
    groups = sorted(ranked)
    rng = np.random.default_rng(1)
    rescued = 0
    for _ in range(200):
        loss = _random_curves(ranked, rng)
        ratio = float(rng.uniform(0.15, 0.6))
        try:
            a = allocate(analysis, ranked, ratio, 0.0, 1, "auto", loss)
        except TargetError:
            continue
        with monkeypatch.context() as m:
            m.setattr(allocate_module, "EXACT_PLAN_LIMIT", 0)
            greedy = allocate(analysis, ranked, ratio, 0.0, 1, "auto", loss)
        tolerance = int(np.floor(a.macs_before * 0.01))
        within = []
        for counts in product(*(range(1, len(ranked[g]) + 1) for g in groups)):
            keep = np.ones(analysis.num_players, dtype=bool)
            for g, k in zip(groups, counts):
                keep[ranked[g][k:]] = False
            if a.target_macs - tolerance <= analysis.macs(keep) <= a.target_macs:
                within.append(sum(loss[g][k] for g, k in zip(groups, counts)))
        assert a.macs_after <= a.target_macs
        if within and greedy.macs_after < a.target_macs - tolerance:
            rescued += 1
            assert a.target_macs - tolerance <= a.macs_after
            assert sum(loss[g][k] for g, k in a.kept.items()) == pytest.approx(min(within))
        elif not within:
            assert a.kept == greedy.kept
    assert rescued >= 3
