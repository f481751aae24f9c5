"""--bn-correct: kept channels of BN-folded layers get back the original's mean and spread."""

import os


import onnxprune
from onnxprune.api import load_labelled
from onnxprune.verify import accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "models", "mnist_cnn")  # BatchNormalization left unfolded in the file


def _accuracy(model, x, y):
    return accuracy(model, x, y, ["CPUExecutionProvider"])


def test_bn_correct_rescues_pruning_without_recovery():
    x, y = load_labelled(BASE + "_test.npz")
    # L1 ranking: channels removed by magnitude leave the next layers' inputs shifted, and the
    # model collapses (SNPFI's own ranking, eliminated on the interactions, already keeps 98%)
    opts = onnxprune.PruneOptions(flops=0.5, recover=False, latency=False, max_images=128, criterion="l1")
    plain = onnxprune.prune(BASE + ".onnx", BASE + "_calib", opts)
    corrected = onnxprune.prune(BASE + ".onnx", BASE + "_calib", opts.replace(bn_correct=True))
    assert plain.report.macs_after == corrected.report.macs_after
    assert any("BN drift corrected on 4 layers" in n for n in corrected.report.notes)
    assert corrected.report.fidelity_relative_error < 0.5 * plain.report.fidelity_relative_error
    # without correction this pruning leaves about 23%; corrected, it is back near the original's 99%
    assert _accuracy(corrected.model, x, y) > max(0.95, _accuracy(plain.model, x, y) + 0.1)


def test_bn_correct_does_nothing_without_batchnorm():
    resnet = os.path.join(ROOT, "models", "fmnist_resnet")  # exported with BN folded: nothing to correct
    opts = onnxprune.PruneOptions(flops=0.3, latency=False, max_images=48, bn_correct=True)
    report = onnxprune.prune(resnet + ".onnx", resnet + "_calib", opts).report
    assert not any("BN drift" in n for n in report.notes)
