"""Prune at several targets and tabulate what each costs and gains: accuracy (or fidelity),
latency and FLOPs against the target, as a table, JSON and (with matplotlib) a PNG plot."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .errors import TargetError
from .options import PruneOptions
from .progress import Progress, silent
from .save import check_output_path


@dataclass
class SweepRow:
    target: float
    reached: bool
    model_path: Optional[str] = None
    flops_reduction: Optional[float] = None
    params_reduction: Optional[float] = None
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    fidelity_top1: Optional[float] = None
    fidelity_error: Optional[float] = None
    latency: List[dict] = field(default_factory=list)  # batch, before_ms, after_ms
    seconds: float = 0.0
    message: str = ""
    rounding: str = ""  # the kept counts the allocation used (the report's words)
    # the share of the original's convolution MACs onnxruntime's CPU kernels no longer run
    # (None where not read: on a GPU, without latency, large models)
    kernels_reduction: Optional[float] = None


@dataclass
class Sweep:
    model: str
    rows: List[SweepRow]
    table_path: str
    json_path: str
    plot_path: Optional[str]  # None when matplotlib is not installed
    notes: List[str] = field(default_factory=list)


def run_sweep(model_path: str, calib, targets: Sequence[float], out_dir: str, options: PruneOptions,
              evaluate=None, progress: Progress = silent, log=lambda line: None) -> Sweep:
    """Prune ``model_path`` at every target in turn, writing ``<stem>-R<target>.onnx`` into
    ``out_dir`` as each finishes, then the table, the JSON and the plot. Loading, analysis,
    calibration and scoring do not depend on the target and are made once (the first row's
    time includes them)."""
    from .api import prune_each

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(model_path))[0]
    rows: List[SweepRow] = []

    def record(target, result):
        if isinstance(result, TargetError):
            rows.append(SweepRow(target, False, message=str(result)))
            return
        r = result.report
        path = os.path.join(out_dir, f"{stem}-R{target:g}.onnx")
        check_output_path(path, model_path)
        result.save(path)  # now: its weights are released when the next target starts
        rows.append(SweepRow(
            target, True, path, r.flops_reduction, r.params_reduction, r.accuracy_before, r.accuracy_after,
            r.fidelity_top1_agreement, r.fidelity_relative_error, list(r.latency),
            r.wall_seconds - r.seconds.get("latency", 0.0), rounding=r.rounding,  # the conversion proper
            kernels_reduction=r.kernels_reduction))

    def announce(target):
        log(f"sweep: --flops {target:g}")

    prune_each(model_path, calib, targets, record, options, evaluate=evaluate, progress=progress, log=log,
               before_each=announce)
    sweep = Sweep(model_path, rows, os.path.join(out_dir, "sweep.md"), os.path.join(out_dir, "sweep.json"), None)
    _write_table(sweep, options)
    with open(sweep.json_path, "w") as f:
        json.dump({"model": model_path, "options": {k: v for k, v in options.__dict__.items() if k != "flops"},
                   "rows": [row.__dict__ for row in rows]}, f, indent=2)
    try:
        sweep.plot_path = _plot(sweep, os.path.join(out_dir, "sweep.png"))
    except ImportError:
        sweep.notes.append("matplotlib is not installed, so no plot: pip install 'onnxprune[plot]'")
    return sweep


def _latency_cell(row: SweepRow, index: int) -> str:
    if len(row.latency) <= index:
        return ""
    lat = row.latency[index]
    return f"{lat['before_ms']:.2f} -> {lat['after_ms']:.2f} ms ({lat['before_ms'] / lat['after_ms']:.2f}x)"


def format_table(sweep: Sweep) -> str:
    labelled = any(r.accuracy_after is not None for r in sweep.rows)
    batches = next((r.latency for r in sweep.rows if r.latency), [])
    kernels = any(r.kernels_reduction is not None for r in sweep.rows)
    head = ["target", "FLOPs removed"] + (["conv MACs run removed"] if kernels else []) + ["params removed"]
    head += ["accuracy (before)"] if labelled else []
    head += ["fidelity top-1", "fidelity error"]
    head += [f"latency batch {lat['batch']}" for lat in batches]
    head += ["conversion s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in sweep.rows:
        if not r.reached:
            lines.append(f"| {r.target:g} | not reachable: {r.message} |" + " |" * (len(head) - 2))
            continue
        cells = [f"{r.target:g}", f"{r.flops_reduction:.1%}"]
        if kernels:
            cells.append(f"{r.kernels_reduction:.1%}" if r.kernels_reduction is not None else "")
        cells.append(f"{r.params_reduction:.1%}")
        if labelled:
            cells.append(f"{r.accuracy_after:.2%} ({r.accuracy_before:.2%})")
        cells.append(f"{r.fidelity_top1:.2%}" if r.fidelity_top1 is not None else "")
        cells.append(f"{r.fidelity_error:.4f}")
        cells += [_latency_cell(r, i) for i in range(len(batches))]
        cells.append(f"{r.seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _roundings_used(sweep: Sweep) -> str:
    used = list(dict.fromkeys(r.rounding or "channels not rounded" for r in sweep.rows if r.reached))
    if len(used) <= 1:
        return used[0] if used else "no target reached"
    return "; ".join(f"at {r.target:g}: {r.rounding or 'channels not rounded'}" for r in sweep.rows if r.reached)


def _write_table(sweep: Sweep, options: PruneOptions) -> None:
    method = "bottleneck" if options.method == "bottleneck" else f"snpfi, criterion {options.criterion}"
    header = (f"# Sweep of {os.path.basename(sweep.model)}\n\nMethod {method}, recovery "
              f"{'on' if options.recover else 'off'}, {_roundings_used(sweep)}. Latency: median over fresh "
              "onnxruntime sessions, before -> after (speedup). Loading, analysis, calibration and scoring do not "
              "depend on the target: they ran once, and the first row's conversion time includes them.\n\n")
    with open(sweep.table_path, "w") as f:
        f.write(header + format_table(sweep) + "\n")


def _plot(sweep: Sweep, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in sweep.rows if r.reached]
    x = [r.target for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if any(r.accuracy_after is not None for r in rows):
        axes[0].plot(x, [100 * r.accuracy_after for r in rows], "o-", label="pruned")
        axes[0].axhline(100 * rows[0].accuracy_before, color="grey", ls="--", label="original")
        axes[0].set_ylabel("top-1 accuracy (%)")
    elif any(r.fidelity_top1 is not None for r in rows):
        axes[0].plot(x, [100 * (r.fidelity_top1 or 0) for r in rows], "o-", label="pruned")
        axes[0].set_ylabel("top-1 agreement with the original (%)")
    else:  # not one output of class scores: no top-1 to plot
        axes[0].plot(x, [r.fidelity_error for r in rows], "o-", label="pruned")
        axes[0].set_ylabel("relative output error")
    axes[0].legend()
    for i, lat in enumerate(rows[0].latency if rows else []):
        axes[1].plot(x, [r.latency[i]["after_ms"] / r.latency[i]["before_ms"] for r in rows], "o-",
                     label=f"batch {lat['batch']}")
    axes[1].plot(x, [1 - t for t in x], ":", color="grey", label="1 - target")
    axes[1].set_ylabel("latency, pruned / original")
    axes[1].legend()
    axes[2].plot(x, [100 * r.flops_reduction for r in rows], "o-", label="achieved")
    if all(r.kernels_reduction is not None for r in rows):
        axes[2].plot(x, [100 * r.kernels_reduction for r in rows], "s--", label="as the CPU kernels run them (conv MACs)")
    axes[2].plot(x, [100 * t for t in x], ":", color="grey", label="target")
    axes[2].set_ylabel("FLOPs removed (%)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("--flops target")
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(sweep.model))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
