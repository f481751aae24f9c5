"""The one definition of every pruning option.

The Python API takes a :class:`PruneOptions`; the CLI builds its flags from
the same fields (``cli.py`` reads ``OPTION_SPECS``), so a new option is added
here once and appears in both, with one help text and one default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import UsageError

FLOAT32_MAX = 3.4028234663852886e38  # inputs are float32: a larger scale or mean overflows
METHODS = ("snpfi", "bottleneck")
CRITERIA = ("snpfi", "l1", "l2", "random", "activation", "bn-scale")
ALLOCATIONS = ("auto", "uniform")
PAYOFFS = ("auto", "local", "refit", "output")
DEVICES = ("auto", "cpu", "cuda")


def _opt(default, help, flag=None, multiple=False, choices=None, metavar=None, is_flag=False):
    return field(
        default=default,
        metadata={
            "help": help,
            "flag": flag,
            "multiple": multiple,
            "choices": choices,
            "metavar": metavar,
            "is_flag": is_flag,
        },
    )


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and how. Field order is the order of ``--help``."""

    flops: Optional[float] = _opt(
        None, "Fraction of the model's FLOPs (multiply-accumulates of Conv, ConvTranspose, "
        "Gemm and MatMul) to remove, in (0, 1).", metavar="R")
    latency_target: Optional[float] = _opt(
        None, "Instead of --flops: fraction of the model's measured latency (at --latency-batch, on the "
        "chosen provider) to remove, in (0, 1). Each prunable layer is timed alone at candidate widths "
        "and the allocation meets the target on that model of the latency, then is corrected by timing "
        "the whole pruned model (at most 4 tries, within 2 points).", flag="--latency", metavar="R")
    method: str = _opt(
        "snpfi", "How channels are chosen: snpfi (rank by --criterion, allocate by --allocation) or "
        "bottleneck (learn one gate per channel under the FLOPs target, keep the channels above one "
        "global threshold; --criterion, --payoff and --allocation do not apply).", choices=METHODS)
    criterion: str = _opt(
        "snpfi", "How channels are ranked within a group: snpfi (filter-wise interaction, Shapley values "
        "of the local payoff) or a baseline (bn-scale: |gamma| of the BatchNormalization after each conv; "
        "groups without one fall back on l1).", choices=CRITERIA)
    payoff: str = _opt(
        "auto", "snpfi's payoff: local (consumer error with removed channels at their mean or zero; "
        "closed-form Shapley values) or refit (consumer error left after refitting on the kept "
        "channels) or output (log-probability of the model's own top-1 class, or of the label with "
        "--labels; distance to the original outputs for non-classifiers; sampled under --budget). "
        "auto: refit with --recover, local without.", choices=PAYOFFS)
    budget: Optional[int] = _opt(
        None, "--payoff output: coalitions evaluated (each a run of the network over the same 32 "
        "calibration images), shared among the groups. Default: 2000, or the least that gives every "
        "group one pair of permutations and its curve where that is more.", metavar="N")
    labels: bool = _opt(
        False, "--payoff output: score against the true labels: the class subfolders of the --calib folder "
        "(sorted, as ImageFolder numbers them) or the 'y' array of a --calib .npz.", is_flag=True)
    allocation: str = _opt(
        "auto", "How many channels each group keeps: auto (from each group's utilisation curve) or "
        "uniform (the same share everywhere).", choices=ALLOCATIONS)
    recover: bool = _opt(
        True, "Refit the layers next to every cut on the calibration data (--no-recover to compare).",
        flag="--recover/--no-recover")
    gate_steps: int = _opt(1000, "bottleneck: optimisation steps of the gates.")
    gate_lr: float = _opt(0.5, "bottleneck: Adam learning rate of the gates' logits.")
    gate_flops_weight: float = _opt(8.0, "bottleneck: weight of the FLOPs-target term.")
    gate_binary_weight: float = _opt(0.25, "bottleneck: weight of the term that drives gates to 0 or 1.")
    bn_correct: bool = _opt(
        False, "After pruning (and recovery), give every kept channel of a layer whose BatchNormalization "
        "was folded the mean and spread it had in the original, measured on the calibration images "
        "(adaptive BN).", flag="--bn-correct/--no-bn-correct")
    input_size: Optional[Tuple[int, int]] = _opt(
        None, "H,W to resize calibration images to where the model's spatial axes are dynamic "
        "(calibration arrays give their own size).",
        metavar="H,W")
    mean: Tuple[float, ...] = _opt(
        (0.0,), "Per-channel mean subtracted after scaling (one value or one per channel). "
        "ImageNet: 0.485,0.456,0.406; [-1, 1] models: 0.5.", metavar="M[,M,M]")
    std: Tuple[float, ...] = _opt(
        (1.0,), "Per-channel std divided by after subtracting the mean. "
        "ImageNet: 0.229,0.224,0.225; [-1, 1] models: 0.5.", metavar="S[,S,S]")
    scale: float = _opt(1.0 / 255.0, "Factor applied to 8-bit pixel values first (default 1/255).")
    bgr: bool = _opt(False, "Feed channels in BGR order (OpenCV/Caffe-trained models).", is_flag=True)
    max_images: int = _opt(256, "Use at most this many calibration images.")
    batch_size: int = _opt(32, "Images per onnxruntime run; bounds memory.")
    holdout: float = _opt(
        0.2, "Fraction of calibration images kept away from scoring and fitting and used "
        "only to measure fidelity.")
    seed: int = _opt(0, "Seed for every random choice (the hold-out split, the random criterion).")
    ignore: Tuple[str, ...] = _opt(
        (), "Leave this layer (node or tensor name) whole; repeatable.", multiple=True,
        metavar="NAME")
    latency_aware: bool = _opt(
        False, "With --flops and --allocation auto: price each pruning step by the latency it saves "
        "(each prunable layer timed at candidate widths, as for --latency) instead of the FLOPs; the "
        "FLOPs target still decides how far pruning goes.", is_flag=True)
    round_to: Optional[int] = _opt(
        None, "Kept channel counts are multiples of N in groups of at least N channels; 1 turns rounding "
        "off. Default: the channel blocks of onnxruntime's CPU convolutions, where a count between two "
        "blocks runs as slowly as the next one up: with AVX-512 multiples of 16 (of 8 in groups under 32), "
        "elsewhere multiples of 8; relaxed to 8, then 1, where that cannot meet the target within a point "
        "(bench/results/*-speed.md).", metavar="N")
    min_keep: float = _opt(
        0.1, "Fraction of each channel group that always stays (at least one channel does).")
    latency: bool = _opt(
        True, "Measure onnxruntime latency before and after (batch 1 and a larger batch); "
        "--no-latency skips it.", flag="--measure-latency/--no-latency")
    latency_batch: int = _opt(32, "The larger batch size the latency is measured at, and the batch "
                              "size --latency R targets.")
    device: str = _opt("auto", "onnxruntime provider: CUDA when a GPU is found (auto), or forced.",
                       choices=DEVICES)

    def validate(self) -> "PruneOptions":
        """Raise UsageError on any value a user could get wrong; return self."""
        if not isinstance(self.latency, bool):
            # the API's names: latency is the measuring switch, the target is latency_target
            raise UsageError("latency switches the latency measurement on or off (True/False); "
                             "a latency target is latency_target=R (--latency R)")
        if self.flops is None and self.latency_target is None:
            raise UsageError("--flops R (or --latency R) is required")
        if self.flops is not None and self.latency_target is not None:
            raise UsageError("give either --flops or --latency, not both")
        if self.flops is not None and not (0.0 < self.flops < 1.0):
            raise UsageError(f"--flops must be in (0, 1), got {self.flops}")
        if self.latency_target is not None and not (0.0 < self.latency_target < 1.0):
            raise UsageError(f"--latency must be in (0, 1), got {self.latency_target}")
        if self.latency_aware and (self.flops is None or self.method != "snpfi" or self.allocation != "auto"):
            raise UsageError("--latency-aware goes with --flops and the default --method snpfi --allocation auto")
        if self.latency_target is not None and self.method == "bottleneck":
            raise UsageError("--latency works with --method snpfi; the bottleneck's soft cost is FLOPs")
        if self.labels and (self.payoff != "output" or self.method != "snpfi"):
            raise UsageError("--labels is read by --payoff output only; add --payoff output or leave it out")
        if self.method == "bottleneck" and (self.criterion, self.payoff, self.allocation) != ("snpfi", "auto", "auto"):
            raise UsageError("--method bottleneck learns its own gates and threshold: --criterion, --payoff and "
                             "--allocation do not apply to it")
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}")
        if self.gate_steps < 1 or not self.gate_lr > 0 or not self.gate_flops_weight >= 0 \
                or not self.gate_binary_weight >= 0 or not all(map(math.isfinite, (
                    self.gate_lr, self.gate_flops_weight, self.gate_binary_weight))):  # NaN passes < and >
            raise UsageError("--gate-steps must be at least 1, --gate-lr positive and the gate weights non-negative")
        if self.criterion not in CRITERIA:
            raise UsageError(f"--criterion must be one of {', '.join(CRITERIA)}")
        if self.payoff not in PAYOFFS:
            raise UsageError(f"--payoff must be one of {', '.join(PAYOFFS)}")
        if self.budget is not None and self.budget < 1:
            raise UsageError("--budget must be at least 1")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}")
        if self.input_size is not None and (
            len(self.input_size) != 2 or min(self.input_size) < 1
        ):
            raise UsageError("--input-size must be two positive integers H,W")
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
            raise UsageError("--mean and --std take one value or three")
        if not all(math.isfinite(v) and abs(v) < FLOAT32_MAX for v in tuple(self.mean) + tuple(self.std) + (self.scale,)):
            raise UsageError("--mean, --std and --scale must be finite numbers within float32's range")
        if any(s == 0 for s in self.std):
            raise UsageError("--std must not contain 0")
        if self.max_images < 1 or self.batch_size < 1:
            raise UsageError("--max-images and --batch-size must be at least 1")
        if not (0.0 <= self.holdout < 1.0):
            raise UsageError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError("--round-to must be at least 1")
        if self.latency_batch < 1:
            raise UsageError("--latency-batch must be at least 1")
        if self.seed < 0:
            raise UsageError("--seed must be a non-negative integer")
        if not self.scale > 0:
            raise UsageError(f"--scale must be positive, got {self.scale}")
        if not (0.0 <= self.min_keep < 1.0):
            raise UsageError(f"--min-keep must be in [0, 1), got {self.min_keep}")
        return self

    def replace(self, **changes) -> "PruneOptions":
        return dataclasses.replace(self, **changes)


OPTION_SPECS = dataclasses.fields(PruneOptions)
