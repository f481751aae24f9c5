"""Sweep onnxprune over the PyTorch-exported corpus in models/corpus/ (no torch needed).

    python bench/torch_corpus.py [--models resnet,vgg,...] [--calib 64] [--fuzz-log LOG]
                                 [--out bench/results/DATE-torch-corpus.md]

models/corpus/ holds one small CNN per family users deploy (made by
bench/make_torch_corpus.py, described in models/corpus/manifest.json). For each one:

1. analysis: ``onnxprune.api.analyze``'s prunable FLOPs share, prunable and blocked groups,
   and why the blocked ones are blocked;
2. exactness, as tests/test_exactness.py proves it (tests/surgery.py): pruning nothing must
   leave the outputs within 1e-6 (relative); then for every prunable group on its own, and
   for all of them at once, a third of its channels are killed (their filters, biases and
   BN shifts set so that they compute constant zero), exactly those are pruned, and the
   outputs (plus the logits before a final Softmax) must stay within 1e-4;
3. pruning: ``onnxprune.prune`` at R = 0.3 (recovery on, the defaults otherwise, no latency
   measurement) with seeded random-normal calibration inputs; the model is written with
   the tool's own atomic save, read back, put through the full ONNX checker and run at
   batch 3, and its output names and shapes compared with the original's.

Every stage of every model is guarded: a failure is recorded with its traceback and the
sweep goes on. The markdown table goes to --out. --fuzz-log takes the output of
``bash bench/fuzz.sh`` and puts its pytest summary line into the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import onnxprune  # noqa: E402
from onnxprune.allocate import _Planner, essentials_first  # noqa: E402
from onnxprune.api import analyze  # noqa: E402
from onnxprune.save import save_atomic  # noqa: E402
from corpus import _cpu_name, _git_rev, _guard, _md, _op_of, _tail, dead_channel_plans, expose_logits  # noqa: E402
from surgery import analysis_of, kill_players, outputs, prune_players, rel_error  # noqa: E402

CORPUS = os.path.join(ROOT, "models", "corpus")
DEAD_LIMIT, NOOP_LIMIT = 1e-4, 1e-6


def manifest() -> Dict[str, dict]:
    with open(os.path.join(CORPUS, "manifest.json")) as f:
        return json.load(f)


def load(name: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(CORPUS, manifest()[name]["file"]))


def sample(info: dict, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + tuple(info["input"][1:])).astype(np.float32)


@dataclass
class Row:
    name: str
    info: dict
    macs: Optional[int] = None
    prunable_share: Optional[float] = None
    ceiling: Optional[float] = None  # most removable with --min-keep 0.1 and --round-to 8
    ceiling_fine: Optional[float] = None  # the same with --round-to 1
    n_prunable: Optional[int] = None
    n_blocked: Optional[int] = None
    main_reason: str = ""
    blocked_top: List[tuple] = field(default_factory=list)  # (share, channels, name, reasons)
    noop_err: Optional[float] = None
    dead_err: Optional[float] = None
    dead_plans: int = 0
    dead_players: int = 0
    prune_ok: Optional[bool] = None
    prune_flops: float = 0.3
    unreachable: str = ""  # the TargetError at 0.3, where the model cannot lose that much
    reduction: Optional[float] = None
    fidelity: Optional[float] = None
    fidelity_no_recover: Optional[float] = None
    refit_rejected: bool = False  # the tool's held-out check wrote the sliced model instead
    prune_note: str = ""
    errors: List[tuple] = field(default_factory=list)  # (stage, class, message, traceback)
    seconds: Dict[str, float] = field(default_factory=dict)


def measure_analysis(row: Row, model: onnx.ModelProto) -> None:
    report = analyze(model, onnxprune.PruneOptions())
    row.macs = report.macs_before
    row.prunable_share = report.prunable_macs_share
    row.n_prunable, row.n_blocked = len(report.groups), len(report.blocked)
    row.ceiling = removable_ceiling(model)
    row.ceiling_fine = removable_ceiling(model, round_to=1)
    row.blocked_top = sorted(((b.macs_share, b.channels, b.name, b.reasons) for b in report.blocked),
                             key=lambda r: -r[0])
    inner = [r for r in row.blocked_top if not all("(output)" in why for why in r[3])]
    if not inner:
        row.main_reason = "only the last layer's outputs (graph output / Softmax)" if row.blocked_top else "—"
        if any("Softmax" in why for r in row.blocked_top for why in r[3]):
            row.main_reason = "only the heads (graph outputs, Softmax)"
        return
    # the blocked group holding the most FLOPs, by the op named first in its reasons
    share, _, _, reasons = inner[0]
    ops = []
    for why in reasons:
        op = _op_of(why)
        if op not in ops:
            ops.append(op)
    row.main_reason = f"{'/'.join(ops[:3])} ({share:.0%} of FLOPs in the largest blocked group): {reasons[0]}"


def removable_ceiling(model: onnx.ModelProto, min_keep: float = 0.1, round_to: int = 8) -> float:
    """The most FLOPs the allocation could remove with the default --min-keep and --round-to:
    every prunable group down to its floor. (The prunable share counts a layer whole when
    only its input or only its output is prunable; this says how much can actually go.)"""
    _, analysis = analysis_of(model)
    ranked = {g.index: np.flatnonzero(analysis.player_group == g.index) for g in analysis.prunable_groups()}
    if not ranked:
        return 0.0
    ranked, essential = essentials_first(analysis, ranked)
    plan = _Planner(analysis, ranked, min_keep, round_to, essential)
    before = plan.model.macs(np.ones(analysis.num_players, dtype=bool))
    return 1.0 - plan.macs(dict(plan.floor)) / before


def measure_dead_channels(row: Row, model: onnx.ModelProto, x: np.ndarray, seed: int) -> None:
    """Worst relative error over the outputs and pre-softmax logits when exactly the killed
    channels are pruned: one plan per prunable group, then all groups at once."""
    model = expose_logits(model)
    ref = outputs(model, x)
    noop = prune_players(model, {})
    onnx.checker.check_model(noop, full_check=True)
    row.noop_err = rel_error(ref, outputs(noop, x))
    _, analysis = analysis_of(model)
    groups = analysis.prunable_groups()
    if not groups:
        return
    plans, everything = dead_channel_plans(analysis, seed)
    worst = 0.0
    for drop in plans:
        if not any(drop.values()):
            continue
        killed = kill_players(model, drop)
        pruned = prune_players(killed, drop)
        onnx.checker.check_model(pruned, full_check=True)
        if [o.name for o in pruned.graph.output] != [o.name for o in model.graph.output]:
            raise AssertionError("pruning changed the output names")
        worst = max(worst, rel_error(outputs(killed, x), outputs(pruned, x)))
        row.dead_plans += 1
    row.dead_players = sum(len(v) for v in everything.values())
    row.dead_err = worst


def _signature(model: onnx.ModelProto) -> List[tuple]:
    out = []
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = tuple(d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim)
        out.append((vi.name, vi.type.tensor_type.elem_type, dims))
    return out


def measure_prune(row: Row, model: onnx.ModelProto, calib: np.ndarray, x3: np.ndarray, seed: int,
                  flops: float = 0.3) -> None:
    opts = onnxprune.PruneOptions(flops=flops, latency=False, seed=seed)
    result = onnxprune.prune(model, calib, opts)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{row.name}_pruned.onnx")
        save_atomic(result.model, path)
        written = onnx.load(path)
    onnx.checker.check_model(written, full_check=True)
    inits = {t.name for t in written.graph.initializer}
    if _signature(written) != [s for s in _signature(model) if s[0] not in inits]:
        raise AssertionError(f"input/output signature changed: {_signature(written)}")
    before, after = outputs(model, x3), outputs(written, x3)
    if [a.shape for a in before] != [b.shape for b in after]:
        raise AssertionError("output shapes changed")
    rep = result.report
    row.prune_ok = True
    row.prune_flops = flops
    row.reduction = rep.flops_reduction
    row.fidelity = rep.fidelity_relative_error
    row.refit_rejected = rep.refit_rejected
    row.prune_note = "; ".join(rep.notes)
    # the same prune without recovery, for scale: on random weights fed random inputs many
    # layer outputs are barely predictable from the kept channels, and refits can overfit
    plain = onnxprune.prune(model, calib, opts.replace(recover=False))
    row.fidelity_no_recover = plain.report.fidelity_relative_error


def _fid_cell(r: Row) -> str:
    return f"{_err(r.fidelity)}{' (refit rejected)' if r.refit_rejected else ''} / {_err(r.fidelity_no_recover)}"


def run_model(name: str, info: dict, args) -> Row:
    row = Row(name, info)
    print(f"== {name}", file=sys.stderr, flush=True)
    model = _guard(row, "load", lambda: load(name))
    if model is None:
        return row
    x2 = sample(info, 2, args.seed)
    _guard(row, "analyze", lambda: measure_analysis(row, model))
    _guard(row, "dead channels", lambda: measure_dead_channels(row, model, x2, args.seed))
    if not args.skip_prune:
        calib = sample(info, args.calib, args.seed + 1)
        x3 = sample(info, 3, args.seed + 2)
        _guard(row, "prune 0.3", lambda: measure_prune(row, model, calib, x3, args.seed))
        target = [e for e in row.errors if e[0] == "prune 0.3" and e[1] == "TargetError"]
        if target and row.ceiling:
            # the tool refused honestly (blocked groups hold too much): show it prunes validly what it can
            row.unreachable = target[0][2]
            row.errors.remove(target[0])
            lower = math.floor(row.ceiling * 20) / 20
            _guard(row, f"prune {lower:g}", lambda: measure_prune(row, model, calib, x3, args.seed, lower))
        if row.prune_ok is None:
            row.prune_ok = False
    return row


# -- the report -----------------------------------------------------------------------------

def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.1%}"


def _err(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.1e}"


def _error_cell(row: Row, stage: str) -> Optional[str]:
    for s, cls, msg, _ in row.errors:
        if s == stage:
            return f"**{cls}**: {msg[:200]}"
    return None


def fuzz_line(path: Optional[str]) -> str:
    """The fuzz run's outcome from its log: hypothesis's per-property counts (run it with
    --hypothesis-show-statistics) and pytest's summary line."""
    if not path:
        return "not run with this sweep (pass --fuzz-log)"
    with open(path) as f:
        text = f.read()
    counts = re.findall(r"(\S+::\S+):\n(?:.*\n)*?\s+- (\d+) passing, (\d+) failing, and (\d+) invalid", text)
    summary = [line.strip() for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    parts = [f"{test.split('::')[-1]}: {ok} passing, {bad} failing" for test, ok, bad, _ in counts]
    if counts:
        parts.insert(0, f"**{sum(int(c[1]) for c in counts)} cases passed, {sum(int(c[2]) for c in counts)} failed**")
    if summary:
        parts.append(f"pytest: {summary[-1]}")
    return "; ".join(parts) if parts else "no pytest summary found in " + path


def markdown(rows: List[Row], args, started: datetime.datetime, elapsed: float) -> str:
    lines = [
        "# onnxprune on the PyTorch-exported corpus",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (sweep took {elapsed / 60:.1f} min)",
        f"- machine: {platform.node()}, {_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}",
        f"- command: `{' '.join(['python'] + sys.argv)}`; onnxprune at {_git_rev()}",
        "- models: models/corpus/ (bench/make_torch_corpus.py, torch 2.13 TorchScript exporter; opsets above 20 "
        "converted with onnx.version_converter). Synthetic families: seeded random He weights, BatchNorm with "
        "random affine parameters and running statistics measured on random inputs. MTCNN: the real "
        "pretrained facenet-pytorch weights.",
        "- prunable share: `report.prunable_macs_share` of `onnxprune.api.analyze` (share of the MACs in layers "
        "that a prunable group's channels enter or leave). Main blocking reason: the blocked group with the "
        "largest FLOPs share, its ops and first reason, leaving out groups blocked only because they are "
        "the network's outputs. Most removable: the FLOPs reduction with every prunable group at its floor "
        "with --min-keep 0.1 (the default) and --round-to 8, and with --round-to 1: how much pruning can "
        "actually take away (at these small widths a group of 8 channels cannot shrink at all under --round-to 8).",
        f"- dead channels: a third of each prunable group's channels killed (filters, biases, BN shifts set so "
        f"they compute 0) and exactly those pruned; one plan per prunable group plus all groups at once; max "
        f"relative error over the outputs and the logits before a final Softmax, batch 2, limit {DEAD_LIMIT:g}. "
        f"No-op: pruning nothing, limit {NOOP_LIMIT:g}.",
        f"- prune 0.3: `onnxprune.prune(model, x, PruneOptions(flops=0.3, latency=False))` with {args.calib} "
        "random-normal calibration inputs (recovery on), written with the tool's atomic save, read back, full "
        "ONNX check, run at batch 3, signature compared. Reduction is the tool's own count on the written model; "
        "fid. err its held-out relative output error, with recovery and (same options) without: random weights "
        "fed random inputs, so not an accuracy. \"refit rejected\": on these random nets a layer's output is mostly "
        "unpredictable from the kept channels and samples per unknown are few (one per image after a global pool), "
        "so the refits fit noise and did worse on the held-out images than the same channels sliced; the tool "
        "then writes the better, on those images, of that slice and the --no-recover conversion (here the "
        "latter: the two columns agree). Before the check these refits were written: MobileNetV3 3.6e+00, "
        "YOLO 1.9e+00.",
        f"- fuzz (`bash bench/fuzz.sh N`: tests/test_fuzz.py with N hypothesis examples per property, random "
        f"networks at opsets 11-21, same code): {fuzz_line(args.fuzz_log)}",
        "",
        "| family | model | opset | BN folded? | weights in Constant nodes? | FLOPs share prunable | most removable "
        "(round-to 8 / 1) | groups prunable / blocked | main blocking reason | dead-channel max err (plans) "
        "| no-op err | R=0.3 valid? | achieved reduction | fid. err (recover / none) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        info = r.info
        if not info.get("bn_in_torch"):
            bn = "no BN"
        elif info["bn_folded"]:
            bn = "folded" + (f" ({info['batchnorm_nodes']} pre-act. BN left)" if info["batchnorm_nodes"] else "")
        else:
            bn = f"**unfolded** ({info['batchnorm_nodes']} BN nodes)"
        const = f"**yes** ({info['constant_node_count']} Constant nodes)" if info["constant_nodes"] else "no"
        groups = "—" if r.n_prunable is None else f"{r.n_prunable} / {r.n_blocked}"
        dead = _error_cell(r, "dead channels") or (
            f"{_err(r.dead_err)} ({r.dead_plans})" if r.dead_err is not None else "no prunable group")
        analysis_err = _error_cell(r, "analyze")
        reason = analysis_err or r.main_reason
        if r.prune_ok and r.unreachable:
            valid = f"refused, as it should: {r.unreachable}; at R={r.prune_flops:g}: yes"
            red, fid = _pct(r.reduction), _fid_cell(r)
        elif r.prune_ok:
            valid, red, fid = "yes", _pct(r.reduction), _fid_cell(r)
        elif r.prune_ok is None:
            valid, red, fid = "not run", "", ""
        else:
            cell = next((_error_cell(r, s) for s, *_ in r.errors if s.startswith("prune")), None)
            valid, red, fid = "**no**: " + (cell or "?"), "—", "—"
        lines.append(f"| {info['family']} | {r.name} | {info['opset']} | {bn} | {const} | {_pct(r.prunable_share)} "
                     f"| {_pct(r.ceiling)} / {_pct(r.ceiling_fine)} | {groups} | {_md(reason)} | {_md(dead)} "
                     f"| {_err(r.noop_err)} | {_md(valid)} | {red} | {fid} |")
    lines += ["", "## Blocked groups by FLOPs share (top 5 per model, first two reasons)", ""]
    for r in rows:
        if not r.blocked_top:
            continue
        lines += [f"### {r.name}", ""]
        for share, channels, name, reasons in r.blocked_top[:5]:
            why = "; ".join(reasons[:2]) + (f"; … ({len(reasons)} reasons)" if len(reasons) > 2 else "")
            lines.append(f"- {share:.1%} `{name}` ({channels} ch): {why}")
        lines.append("")
    notes = [(r.name, r.prune_note) for r in rows if r.prune_note]
    if notes:
        lines += ["## Notes from the pruning reports", ""] + [f"- {n}: {t}" for n, t in notes] + [""]
    failures = [(r.name, e) for r in rows for e in r.errors]
    if failures:
        lines += ["## Failures", ""]
        for name, (stage, cls, msg, tb) in failures:
            lines += [f"### {name} — {stage}: {cls}", "", "```"] + _tail(tb, 14) + ["```", ""]
    stages = []
    for r in rows:
        stages += [s for s in r.seconds if s not in stages]
    lines += ["## Seconds per stage", "", "| model | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(f"{r.seconds[s]:.1f}" if s in r.seconds else "" for s in stages)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    entries = manifest()
    ap.add_argument("--models", default=",".join(entries), help="comma-separated subset of: " + ", ".join(entries))
    ap.add_argument("--skip-prune", action="store_true", help="only analysis and dead channels")
    ap.add_argument("--calib", type=int, default=64, help="random-normal calibration inputs for prune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fuzz-log", default=None, help="output of bash bench/fuzz.sh, for its summary line")
    ap.add_argument("--out", default=os.path.join(HERE, "results", f"{datetime.date.today().isoformat()}-torch-corpus.md"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in entries]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(entries)}")
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    rows = []
    for name in names:
        rows.append(run_model(name, entries[name], args))
        r = rows[-1]
        print(f"  share {_pct(r.prunable_share)}, ceiling {_pct(r.ceiling)}, groups {r.n_prunable}/{r.n_blocked}, "
              f"dead {_err(r.dead_err)} "
              f"noop {_err(r.noop_err)}, prune {r.prune_ok} {_pct(r.reduction)}", file=sys.stderr, flush=True)
    text = markdown(rows, args, started, time.perf_counter() - t0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
