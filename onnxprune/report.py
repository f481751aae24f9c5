"""What a run did, as plain data (JSON for --report) and as the CLI's summary table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class GroupRow:
    name: str
    producers: List[str]
    channels: int
    kept: int
    macs_share: float  # share of the model's MACs in layers these channels enter or leave
    payoff_kept: Optional[float] = None  # share of the group's payoff its kept channels retain
    curve: List[float] = field(default_factory=list)  # payoff retained at 25/50/75% of channels
    importance_spread: Optional[float] = None  # coefficient of variation of channel importances


@dataclass
class BlockedRow:
    name: str
    channels: int
    macs_share: float
    reasons: List[str]


@dataclass
class Report:
    input_path: Optional[str] = None
    output_path: Optional[str] = None
    provider: str = ""
    method: str = "snpfi"
    criterion: str = ""
    payoff: str = ""
    allocation: str = "auto"
    rounding: str = ""  # the kept counts allowed, as said in the summary
    round_to: int = 1  # the --round-to the allocation used
    recovery: bool = True
    refitted_layers: int = 0
    flops_target: float = 0.0
    latency_target: Optional[float] = None
    latency_model: Optional[dict] = None  # --latency: the modelled latency before/after at its batch
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    file_size_before: Optional[int] = None
    file_size_after: Optional[int] = None
    prunable_macs_share: float = 0.0
    groups: List[GroupRow] = field(default_factory=list)
    blocked: List[BlockedRow] = field(default_factory=list)
    calibration_images: int = 0
    skipped_files: int = 0
    holdout_images: int = 0  # calibration images kept away from scoring and fitting
    fidelity_images: int = 0  # the images fidelity was measured on: the held-out ones, or all when none are
    fidelity_top1_agreement: Optional[float] = None
    fidelity_relative_error: Optional[float] = None
    fidelity_held_out: bool = True
    # recovery on, images held out: the same allocation without the refit, measured beside it
    fidelity_without_refit: Optional[dict] = None  # relative_error, top1_agreement
    refit_rejected: bool = False  # the refit did worse on the held-out images and was not written
    fidelity_rejected_refit: Optional[dict] = None  # then: the refit's own relative_error, top1_agreement
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    # with the refit checked against slicing: the accuracy of the model measured beside the
    # written one, the same channels merely sliced (or, where it was rejected, the refit)
    accuracy_without_refit: Optional[float] = None
    accuracy_rejected_refit: Optional[float] = None
    eval_samples: int = 0
    folded_batchnorms: int = 0
    payoff_cost: Optional[dict] = None  # --payoff output: coalitions evaluated, seconds
    gates: Optional[dict] = None  # bottleneck: steps, soft FLOPs ratio, fidelity loss, binarised share
    latency: List[dict] = field(default_factory=list)  # batch, before_ms, after_ms per batch size
    # on the CPU provider, with latency: convolution MACs per sample counted and executed by
    # onnxruntime before and after, and the layers the pruning cut that it runs padded
    kernel_macs: Optional[dict] = None
    seconds: Dict[str, float] = field(default_factory=dict)  # per stage (latency_* inside score_allocate)
    wall_seconds: Optional[float] = None  # the whole conversion, writing excepted
    peak_rss_bytes: Optional[int] = None  # most resident memory of the process up to the end
    notes: List[str] = field(default_factory=list)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def kernels_reduction(self) -> Optional[float]:
        """The share of the original's convolution MACs onnxruntime's CPU kernels no longer run
        (None where they were not read)."""
        k = self.kernel_macs
        return 1.0 - k["executed_after"] / k["executed_before"] if k else None

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flops_reduction"] = self.flops_reduction
        d["params_reduction"] = self.params_reduction
        d["flops_convention"] = "multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul, per sample"
        return d

    def _recovery_text(self) -> str:
        if not self.recovery:
            return "off"
        if self.refit_rejected:
            return "on (the refit did worse on held-out images: written without it)"
        return f"on ({self.refitted_layers} layers refitted)"

    def format_analysis(self) -> str:
        lines = [f"FLOPs: {_si(self.macs_before)} MACs per sample; "
                 f"{self.prunable_macs_share:.1%} in layers that prunable groups enter or leave", ""]
        lines.append(f"{'prunable channel group':50}{'channels':>9}{'FLOPs share':>13}")
        for g in sorted(self.groups, key=lambda g: -g.macs_share):
            lines.append(f"{_cut(g.name, 50):50}{g.channels:>9}{g.macs_share:>13.1%}")
        if self.blocked:
            lines.append("")
            lines.append(f"{'blocked channel group':50}{'channels':>9}{'FLOPs share':>13}  why")
            for b in sorted(self.blocked, key=lambda b: -b.macs_share):
                lines.append(f"{_cut(b.name, 50):50}{b.channels:>9}{b.macs_share:>13.1%}  {b.reasons[0]}")
                for r in b.reasons[1:]:
                    lines.append(f"{'':74}{r}")
        return "\n".join(lines)

    def format_text(self) -> str:
        lines = []
        add = lines.append

        def pct(before, after):
            return f"{(1 - after / before):+.1%}".replace("+", "-", 1) if before else "n/a"

        add(f"{'':22}{'before':>14}{'after':>14}{'removed':>10}")
        add(f"{'FLOPs (MACs/sample)':22}{_si(self.macs_before):>14}{_si(self.macs_after):>14}{self.flops_reduction:>10.1%}")
        add(f"{'parameters':22}{_si(self.params_before):>14}{_si(self.params_after):>14}{self.params_reduction:>10.1%}")
        if self.file_size_before and self.file_size_after:
            add(f"{'file size':22}{_bytes(self.file_size_before):>14}{_bytes(self.file_size_after):>14}"
                f"{1 - self.file_size_after / self.file_size_before:>10.1%}")
        for lat in self.latency:
            add(f"{'latency, batch ' + str(lat['batch']):22}{lat['before_ms']:>11.2f} ms{lat['after_ms']:>11.2f} ms"
                f"{lat['before_ms'] / lat['after_ms']:>8.2f}x  speedup")
        if self.accuracy_before is not None:
            add(f"{'accuracy':22}{self.accuracy_before:>14.2%}{self.accuracy_after:>14.2%}"
                f"{(self.accuracy_before - self.accuracy_after) * 100:>9.2f}p  ({self.eval_samples} labelled samples)")
            # a rejected refit may be of other channels than those written (--no-recover's won)
            for label, other, which in (("  without the refit", self.accuracy_without_refit, "the same channels"),
                                        ("  rejected refit", self.accuracy_rejected_refit, "not written")):
                if other is not None:
                    add(f"{label:22}{'':14}{other:>14.2%}{(self.accuracy_before - other) * 100:>9.2f}p  ({which})")
        add("")
        if self.latency:
            where = self.provider.split(' (')[0]
            # on a GPU a run fed NumPy arrays copies them there and back, and at small sizes
            # that is much of the time pruning cannot shorten: say what was timed
            copies = "; each run copies its input to the GPU and output back" if where.startswith("CUDA") else ""
            add(f"latency: median over fresh onnxruntime sessions on {where}, interleaved{copies}")
        kernels = _kernel_text(self.kernel_macs, self.kernels_reduction) if self.kernel_macs else None
        if kernels:
            add(kernels)
        if self.gates:
            add(f"learned bottleneck: {self.gates['steps']} steps, soft FLOPs {self.gates['soft_flops_ratio']:.1%} "
                f"of the original, {self.gates['binary_share']:.0%} of gates below 0.1 or above 0.9")
        if self.payoff_cost:
            pc = self.payoff_cost
            add(f"output payoff: {pc['evaluations']} coalitions evaluated in {pc['seconds']:.1f} s")
        if self.latency_model:
            lm = self.latency_model
            measured = "measured above" if self.latency else "the whole model not measured (--no-latency)"
            add(f"latency target -{_share(self.latency_target)} at batch {lm['batch']}: modelled "
                f"{lm['before_ms']:.2f} -> {lm['after_ms']:.2f} ms ({_change(lm['reduction'])}) from "
                f"{lm['layers_timed']} layers timed at candidate widths; {measured}")
            if lm.get("steps"):
                add("  allocations timed whole (model share asked -> measured reduction): " + ", ".join(
                    f"{_change(asked)} -> {_change(measured)}" for asked, measured in lm["steps"]))
        target = f"FLOPs target -{_share(self.flops_target)}, achieved" if not self.latency_target else "FLOPs"
        add(f"{target} -{self.flops_reduction:.1%}; "
            f"{'method bottleneck, ' if self.method == 'bottleneck' else ''}criterion {self.criterion}{' (' + self.payoff + ' payoff)' if self.payoff else ''}, allocation {self.allocation}"
            f"{', ' + self.rounding if self.rounding else ''}, "
            f"recovery {self._recovery_text()}; "
            f"{self.prunable_macs_share:.0%} of FLOPs sit in layers touching prunable groups")
        add("")
        add(f"{'pruned channel group':40}{'kept':>12}{'payoff kept':>13}")
        for g in self.groups:
            kept = f"{g.payoff_kept:.1%}" if g.payoff_kept is not None else ""
            add(f"{_cut(g.name, 40):40}{f'{g.kept}/{g.channels}':>12}{kept:>13}")
        if self.blocked:
            add("")
            add("left whole:")
            for b in self.blocked:
                add(f"  {_cut(b.name, 38):38} {b.channels:>5} ch  {_cut(b.reasons[0], 80)}"
                    + (f" (+{len(b.reasons) - 1} more)" if len(b.reasons) > 1 else ""))
        add("")
        where = "held-out calibration images" if self.fidelity_held_out else "calibration images (none held out: the ones pruning used)"
        fid = f"fidelity on {self.fidelity_images} {where}: relative output error {self.fidelity_relative_error:.4f}"
        if self.fidelity_top1_agreement is not None:
            fid += f", top-1 agreement {self.fidelity_top1_agreement:.2%}"
        for label, other in (("without the refit", self.fidelity_without_refit),
                             ("with the rejected refit", self.fidelity_rejected_refit)):
            if other is not None:
                fid += f"; {label} {other['relative_error']:.4f}"
                if other.get("top1_agreement") is not None:
                    fid += f", {other['top1_agreement']:.2%}"
        add(fid)
        if self.wall_seconds is not None:
            stages = ", ".join(f"{_STAGE_NAMES.get(k, k)} {v:.1f}" for k, v in self.seconds.items()
                               if k not in ("latency_model", "latency_steer") and v >= 0.05)
            line = f"conversion {self.wall_seconds:.1f} s" + (f" ({stages})" if stages else "")
            if self.peak_rss_bytes:
                line += f"; peak memory {_bytes(self.peak_rss_bytes)} (resident, whole process)"
            add(line)
        for note in self.notes:
            add(f"note: {note}")
        return "\n".join(lines)


PADDED_LISTED = 3  # padded layers named in the summary; --report lists them all


def _kernel_text(k: dict, executed: float) -> Optional[str]:
    """One line: the convolution MACs onnxruntime's CPU kernels run (``executed``: the share
    removed), against those counted; None where they agree within half a point, no pruned
    layer is padded and onnxruntime converts layouts no more often than for the original."""
    counted = 1 - k["counted_after"] / k["counted_before"]
    padded = k["padded"]
    conversions = k.get("layout_changes_after", 0) - k.get("layout_changes_before", 0)
    if not padded and abs(counted - executed) < 0.005 and conversions <= 0:
        return None
    text = (f"CPU kernels: onnxruntime's convolutions run {_fewer(executed)} multiply-accumulates than the "
            f"original's ({_fewer(counted)} counted)")
    if padded:
        named = ", ".join(f"{_cut(p['layer'], 40)} {_padding(p['held'], p['run'])}" for p in padded[:PADDED_LISTED])
        more = f" and {len(padded) - PADDED_LISTED} more" if len(padded) > PADDED_LISTED else ""
        text += (f"; it pads {len(padded)} pruned layer{'s' if len(padded) > 1 else ''} to whole channel blocks "
                 f"({named}{more}), where a cut saves less than it counts")
    if conversions > 0:
        text += (f"; it converts {conversions} more tensor{'s' if conversions > 1 else ''} between its blocked "
                 f"layout and the plain one, for layers reading part of a block")
    return text


def _padding(held, run) -> str:
    """8 -> 16 filters, 12 -> 16 inputs, or 24x28 -> 32x32 filters x inputs."""
    axes = [i for i in (0, 1) if held[i] != run[i]]
    if len(axes) == 2:
        return f"{held[0]}x{held[1]} -> {run[0]}x{run[1]} filters x inputs"
    i = axes[0] if axes else 0
    return f"{held[i]} -> {run[i]} {('filters', 'inputs')[i]}"


def _fewer(reduction: float) -> str:
    return f"{reduction:.1%} fewer" if reduction >= 0 else f"{-reduction:.1%} more"


_STAGE_NAMES = {"load_prepare_analyse": "load", "score_allocate": "score and allocate",
                "bn_correct": "BN drift", "latency": "latency measurement", "evaluate": "--eval accuracy"}


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _change(reduction: float) -> str:
    """A reduction as a signed change: -30.0%, or +12.0% where the model got slower."""
    return f"-{reduction:.1%}" if reduction >= 0 else f"+{-reduction:.1%}"


def _share(r: float) -> str:
    """A target as the user gave it: 30%, 29.9%."""
    return f"{r:.0%}" if abs(r * 100 - round(r * 100)) < 1e-9 else f"{r:.1%}"


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: width - 1] + "…"
