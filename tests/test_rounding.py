"""Default --round-to: the kernels' channel block where the target allows it, finer where not."""

import os

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
    monkeypatch.setattr(api, "kernel_channel_block", lambda providers: 16)


def test_kept_counts_are_multiples_of_the_block_by_default(block_16):
    report = _prune("mnist_cnn", 0.3)
    assert report.rounding == "channels in multiples of 16"
    assert 0.3 <= report.flops_reduction <= 0.31
    assert any(g.kept < g.channels for g in report.groups)
    for g in report.groups:
        assert g.kept % 16 == 0 or g.kept == g.channels, (g.name, g.kept, g.channels)


def test_finer_rounding_where_the_block_cannot_reach_the_target(block_16):
    # fmnist_resnet's first stage is 16 channels wide: in multiples of 16 at most 52% of its
    # FLOPs can go; by default the target is reached in multiples of 8 instead, and said so
    report = _prune("fmnist_resnet", 0.6)
    assert 0.6 <= report.flops_reduction <= 0.61
    assert "multiples of 8" in report.rounding and "could not meet the target" in report.rounding
    with pytest.raises(onnxprune.PruneError, match="at most 52"):
        _prune("fmnist_resnet", 0.6, round_to=16)  # asked for: a constraint, not a preference
