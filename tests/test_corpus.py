"""The PyTorch-exported corpus (models/corpus/, made by bench/make_torch_corpus.py): one small
CNN per family users deploy, plus the real MTCNN networks. On every one, pruning nothing
changes nothing, pruning killed channels of every prunable group is exact, and a 30% prune
writes a valid model.

bench/torch_corpus.py runs the full sweep (one dead-channel plan per group, more
calibration data); here each model gets one plan that kills channels of all its prunable
groups at once and a prune on a handful of calibration inputs, to keep CI short.
"""

import json
import os

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.flops import count_macs
from surgery import analysis_of, kill_players, outputs, prune_players, rel_error, spare_one_per_layer

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "corpus")
with open(os.path.join(CORPUS, "manifest.json")) as f:
    MANIFEST = json.load(f)
NAMES = list(MANIFEST)

# Models whose channels the analysis cannot follow through most of their FLOPs, so that
# R = 0.3 cannot be reached; the tool must say so, and prune validly what it can.
# AlexNet: torch writes nn.LocalResponseNorm as a 5-D view, Pad and AveragePool over the
# channel axis, which blocks the first two convs (69% of the FLOPs) - rightly: LRN mixes
# neighbouring channels.
UNREACHABLE = {"alexnet": 0.25}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(CORPUS, MANIFEST[name]["file"]))


def sample(name: str, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + tuple(MANIFEST[name]["input"][1:])).astype(np.float32)


def test_corpus_covers_the_variants_the_issue_asks_for():
    opsets = {m["opset"] for m in MANIFEST.values()}
    assert min(opsets) == 11 and max(opsets) >= 21
    assert sum(1 for m in MANIFEST.values() if m["bn_in_torch"] and not m["bn_folded"]) >= 3
    assert sum(1 for m in MANIFEST.values() if m["constant_nodes"]) >= 2
    assert {"mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"} <= set(MANIFEST)
    assert sum(os.path.getsize(os.path.join(CORPUS, m["file"])) for m in MANIFEST.values()) < 4.5 * 2 ** 20


@pytest.mark.parametrize("name", NAMES)
def test_corpus_file_is_what_the_manifest_says(name):
    model, info = load(name), MANIFEST[name]
    ops = [n.op_type for n in model.graph.node]
    assert model.opset_import[0].version == info["opset"]
    assert ops.count("BatchNormalization") == info["batchnorm_nodes"]
    if not info["bn_folded"]:
        assert info["batchnorm_nodes"] > 0
    if info["constant_nodes"]:
        assert not model.graph.initializer and ops.count("Constant") == info["constant_node_count"]


@pytest.mark.parametrize("name", NAMES)
def test_dead_channels_of_every_prunable_group_are_removed_exactly(name):
    model = load(name)
    x = sample(name, 2, 0)
    ref = outputs(model, x)
    assert rel_error(ref, outputs(prune_players(model, {}), x)) < 1e-6
    _, analysis = analysis_of(model)
    groups = analysis.prunable_groups()
    assert groups
    rng = np.random.default_rng(1)
    third = {g.index: sorted(rng.choice(g.size, max(1, g.size // 3), replace=False).tolist()) for g in groups}
    drop = spare_one_per_layer(analysis, third)
    killed = kill_players(model, drop)
    pruned = prune_players(killed, drop)
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert rel_error(outputs(killed, x), outputs(pruned, x)) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_prune_30_percent_writes_a_valid_model(name, tmp_path):
    model = load(name)
    calib = sample(name, 8, 1)
    flops = 0.3
    opts = onnxprune.PruneOptions(flops=flops, latency=False, holdout=0.25)
    if name in UNREACHABLE:
        with pytest.raises(onnxprune.TargetError, match="at most"):
            onnxprune.prune(model, calib, opts)
        flops = UNREACHABLE[name]
        opts = opts.replace(flops=flops)
    result = onnxprune.prune(model, calib, opts)
    path = str(tmp_path / "pruned.onnx")
    onnx.save(result.model, path)
    written = onnx.load(path)
    onnx.checker.check_model(written, full_check=True)
    x = sample(name, 3, 2)
    before, after = outputs(model, x), outputs(written, x)
    assert [o.name for o in written.graph.output] == [o.name for o in model.graph.output]
    assert [a.shape for a in after] == [b.shape for b in before]
    rep = result.report
    assert rep.macs_before == count_macs(model, {"input": MANIFEST[name]["input"]})
    assert flops - 0.005 <= rep.flops_reduction < flops + 0.1
