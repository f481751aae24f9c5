"""Default --round-to: the kernels' channel block where the target allows it, finer where not."""

import os

import numpy as np

import pytest

import onnxprune
from onnxprune import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prune(name, flops, **kw):
    base = os.path.join(ROOT, "models", name)
    opts = onnxprune.PruneOptions(flops=flops, latency=False, recover=False, max_images=64, **kw)
    return onnxprune.prune(base + ".onnx", base + "_calib", opts).report


@pytest.fixture
def block_16(monkeypatch):
    # the same on every machine: as on a CPU with AVX-512
    monkeypatch.setattr(api, "kernel_channel_block", lambda providers: (16, 8))


def test_kept_counts_are_multiples_of_the_block_by_default(block_16):
    report = _prune("mnist_cnn", 0.3)
    assert report.rounding == "channels in multiples of 16 (8 in groups under 32)"
    assert 0.3 <= report.flops_reduction <= 0.31
    assert any(g.kept < g.channels for g in report.groups)
    for g in report.groups:
        unit = 8 if g.channels < 32 else 16
        assert g.kept % unit == 0 or g.kept == g.channels, (g.name, g.kept, g.channels)


def test_narrow_groups_are_halved_in_half_blocks(block_16):
    # fmnist_resnet's first stage is 16 channels wide: in multiples of 16 it could not lose a
    # channel (at most 52% of the FLOPs could go); in half-blocks it reaches -80%
    report = _prune("fmnist_resnet", 0.8)
    assert 0.8 <= report.flops_reduction <= 0.81
    assert "could not" not in report.rounding
    assert any(g.channels == 16 and g.kept == 8 for g in report.groups)
    with pytest.raises(onnxprune.PruneError, match="at most 52"):
        _prune("fmnist_resnet", 0.6, round_to=16)  # asked for: a constraint, not a preference


def test_finer_rounding_where_the_blocks_overshoot_the_target(block_16):
    # at -85% the block steps of fmnist_resnet's wide groups land past 86%: by default the
    # allocation is redone in multiples of 8, and the summary says so
    report = _prune("fmnist_resnet", 0.85)
    assert 0.85 <= report.flops_reduction <= 0.86
    assert report.rounding.startswith("channels in multiples of 8;") and "could not meet the target" in report.rounding


def test_an_explicit_round_to_lands_within_a_point_where_some_plan_does():
    # mnist_cnn in whole blocks at -50%: the greedy steps and their trades land more than a
    # point past the target (its five groups move in steps of 16), though a plan of the same
    # blocks lands within it; an explicit --round-to, with no finer rounding to fall back to,
    # takes that plan
    report = _prune("mnist_cnn", 0.5, round_to=16)
    assert 0.5 <= report.flops_reduction <= 0.51
    assert not any("more than 1 point" in n for n in report.notes)
    for g in report.groups:
        assert g.kept % 16 == 0 or g.kept == g.channels, (g.name, g.kept, g.channels)


@pytest.mark.parametrize("round_to, advice", [(8, "try --round-to 1"), (None, "with channels unrounded"), (1, "with channels unrounded")])
def test_missed_target_note_advises_only_what_was_not_tried(round_to, advice):
    """A two-channel group moves in steps of half its FLOPs: -20% cannot be met within a point.
    The default rounding already falls back to unrounded counts, so it must not advise them."""
    from tiny import Builder

    b = Builder(seed=0)
    x = b.relu(b.conv("input", 3, 2))
    x = b.relu(b.conv(x, 2, 4))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    model = b.model(b.gemm(x, 4, 3), ["N", 3])
    cal = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    report = onnxprune.prune(model, cal, onnxprune.PruneOptions(flops=0.2, round_to=round_to, latency=False)).report
    assert abs(report.flops_reduction - 0.2) > 0.01
    assert any("more than 1 point from the target" in n and advice in n for n in report.notes)


def test_a_later_sweep_target_whose_rounding_falls_back_keeps_its_own_time(block_16):
    """The fallback's words in the report must not change which of a sweep's targets carries
    the shared stages' time."""
    got = {}
    model = os.path.join(ROOT, "models", "fmnist_resnet")
    onnxprune.prune_each(model + ".onnx", model + "_calib", [0.3, 0.85], lambda t, r: got.__setitem__(t, r.report),
                         onnxprune.PruneOptions(max_images=64, latency=False))
    later = got[0.85]
    assert "could not meet the target" in later.rounding
    assert api.SHARED_NOTE in later.notes and "calibrate" not in later.seconds
