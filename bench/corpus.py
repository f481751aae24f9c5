"""Sweep onnxprune over the model-zoo CNNs that ship inside the ``onnx`` wheel.

    python bench/corpus.py [--models alexnet,squeezenet,...] [--skip-prune]
                           [--recover-smallest 4] [--out bench/results/corpus.md]

The graphs under onnx/backend/test/data/light/ (AlexNet, DenseNet-121,
Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) are the
real model-zoo architectures at opset 9, with every weight replaced by a
ConstantOfShape node that fills it with one value. For each one this script

1. gives it seeded random weights (He init for Conv/Gemm, BatchNormalization
   with positive variances), converts it to opset 13, makes the batch axis
   dynamic, and checks it (shape inference, the full ONNX checker, an
   onnxruntime run at batch 2);
2. asks ``onnxprune.api.analyze`` which channel groups are prunable and why the
   others are blocked;
3. proves exactness the way tests/test_exactness.py does, with tests/surgery.py:
   chosen channels are made dead (unused by every consumer, or killed at their
   producer) and pruning exactly those must leave the outputs unchanged;
4. runs ``onnxprune.prune`` at a 30% FLOPs target without recovery (and with it
   on the smallest models) and records the achieved reduction or the error.

Every stage of every model is guarded: a failure is recorded (with its
traceback on stderr and in the report) and the sweep goes on. The markdown
table goes to --out.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, version_converter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the exactness helpers of the test-suite

import onnxprune  # noqa: E402
from onnxprune.api import analyze  # noqa: E402
from run_bench import cpu_name as _cpu_name, git_rev as _git_rev  # noqa: E402
from surgery import (analysis_of, kill_players, outputs, prune_players, rel_error,  # noqa: E402
                     spare_one_per_layer, unuse_players)

ZOO = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = collections.OrderedDict([
    ("alexnet", "light_bvlc_alexnet.onnx"),
    ("densenet121", "light_densenet121.onnx"),
    ("inception_v1", "light_inception_v1.onnx"),
    ("inception_v2", "light_inception_v2.onnx"),
    ("resnet50", "light_resnet50.onnx"),
    ("shufflenet", "light_shufflenet.onnx"),
    ("squeezenet", "light_squeezenet.onnx"),
    ("vgg19", "light_vgg19.onnx"),
    ("zfnet512", "light_zfnet512.onnx"),
])
TARGET_OPSET = 13
TARGET_IR = 7  # the IR version that opset 13 needs
ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Relu6", "HardSwish", "PRelu")


# -- building a runnable model from a zoo graph ---------------------------------

def _consumers(graph: onnx.GraphProto) -> Dict[str, List[tuple]]:
    out: Dict[str, List[tuple]] = collections.defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                out[name].append((node, i))
    return out


def _role(name: str, shape: tuple, consumers) -> tuple:
    """What a weight tensor is for, from its first consumer: (kind, fan_in).

    Reshape and Unsqueeze of a weight (Inception v1 reshapes its classifier's
    weight; DenseNet and Inception v2 unsqueeze the scale layer's parameters
    before a Mul/Add) are looked through to the op that finally uses it.
    """
    uses = consumers.get(name, [])
    if not uses:
        return "unused", 1
    node, index = uses[0]
    if node.op_type in ("Reshape", "Unsqueeze") and index == 0:
        kind, _ = _role(node.output[0], shape, consumers)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return kind, fan_in
    op = node.op_type
    if op == "Conv" and index == 1:
        return "weight", int(np.prod(shape[1:]))
    if op == "Gemm" and index == 1:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return "weight", int(shape[1] if trans_b else shape[0])
    if op == "MatMul" and index == 1:
        return "weight", int(shape[0])
    if op == "BatchNormalization":
        return ("bn_scale", "bn_bias", "bn_mean", "bn_var")[index - 1], 1
    if op == "Mul":
        return "scale", 1
    return "shift", 1  # Conv/Gemm biases, Add/Sum constants


def _draw(kind: str, fan_in: int, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if kind == "weight":
        return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)  # He init: ReLU keeps the scale
    if kind in ("bn_scale", "scale"):
        return rng.normal(1.0, 0.1, shape)
    if kind == "bn_var":
        return rng.uniform(0.5, 1.5, shape)  # must be positive
    return rng.normal(0.0, 0.05, shape)  # biases, BN shifts and means: small


def materialise(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Replace every ConstantOfShape weight (and every float initializer) by seeded
    random values of the same shape, as initializers.

    The few float initializers these files hold (some BatchNormalization
    statistics, some biases) are remnants of other checkpoints that do not
    match the constant-filled rest (ShuffleNet's first variances are 1e-14), so
    they are drawn afresh too: the network is then one consistent random net.
    Each tensor's generator is seeded from the seed and its name, so values do
    not depend on the order of the graph.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers = _consumers(g)
    targets: Dict[str, tuple] = {}
    keep_nodes = []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            targets[node.output[0]] = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        else:
            keep_nodes.append(node)
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1:
            targets[t.name] = tuple(t.dims)
    new_inits = [t for t in g.initializer if t.name not in targets]
    for name, shape in targets.items():
        kind, fan_in = _role(name, shape, consumers)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        new_inits.append(numpy_helper.from_array(_draw(kind, fan_in, shape, rng).astype(np.float32), name))
    del g.node[:]
    g.node.extend(keep_nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    del g.initializer[:]
    g.initializer.extend(t for t in new_inits if t.name in used)  # drops the __SHAPE tensors
    # IR 3 lists every initializer as a graph input too; IR >= 4 need not, and
    # onnxruntime only constant-folds initializers that are not inputs
    names = {t.name for t in g.initializer}
    data = [i for i in g.input if i.name not in names and i.name in used]
    del g.input[:]
    g.input.extend(data)
    return m


def dynamic_batch(model: onnx.ModelProto) -> None:
    """Make axis 0 of the input and outputs symbolic so the model takes any batch.

    The zoo graphs spell batch 1 into their Reshape targets ((1, 9216) before
    AlexNet's classifier, (1, 4, 28, 56, 56) in ShuffleNet's channel shuffle):
    where a Reshape of an activation starts with 1, that 1 becomes 0 ("copy
    the batch axis"), which computes the same at batch 1. Weight reshapes
    (Inception v1's classifier) are left alone.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for vi in list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "N"
    users = _consumers(g)
    for node in g.node:
        if node.op_type != "Reshape" or node.input[0] in inits or node.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[node.input[1]]).copy()
        if target.size < 2 or target[0] != 1:
            continue
        target[0] = 0
        if len(users[node.input[1]]) > 1:  # a target shared with another node: give this one its own
            name = f"{node.input[1]}__{node.output[0]}"
            g.initializer.append(numpy_helper.from_array(target, name))
            inits[name] = g.initializer[-1]
            node.input[1] = name
        else:
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))


def build(name: str, seed: int) -> onnx.ModelProto:
    """The zoo graph with random weights, at opset 13, batch-dynamic and checked."""
    model = onnx.load(os.path.join(ZOO, MODELS[name]))
    model = materialise(model, seed)
    model.ir_version = TARGET_IR
    model = version_converter.convert_version(model, TARGET_OPSET)
    model.ir_version = TARGET_IR
    dynamic_batch(model)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def input_of(model: onnx.ModelProto, n: int, seed: int) -> np.ndarray:
    vi = model.graph.input[0]
    shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)[1:]
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def expose_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose outputs also include the input of every Softmax that makes a graph output.

    With random weights the softmax saturates (ResNet's residual sums grow with
    depth), so an error on the probabilities alone would hide behind it. The
    logits are already blocked (they reach the Softmax, which mixes channels),
    so exposing them changes no channel group.
    """
    m = onnx.shape_inference.infer_shapes(model)
    infos = {vi.name: vi for vi in m.graph.value_info}
    producer = {o: n for n in m.graph.node for o in n.output}
    for out in list(m.graph.output):
        node = producer.get(out.name)
        # the opset converter wraps a 4-D Softmax as Flatten -> Softmax -> Reshape (SqueezeNet)
        while node is not None and node.op_type in ("Reshape", "Flatten", "Squeeze"):
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Softmax" and node.input[0] in infos:
            extra = onnx.ValueInfoProto()
            extra.CopyFrom(infos[node.input[0]])
            m.graph.output.append(extra)
    del m.graph.value_info[:]
    return m


# -- the measurements -----------------------------------------------------------

@dataclass
class Row:
    name: str
    nodes_zoo: Optional[int] = None
    nodes: Optional[int] = None
    gmacs: Optional[float] = None
    logit_std: Optional[float] = None
    prunable_share: Optional[float] = None
    n_prunable: Optional[int] = None
    n_blocked: Optional[int] = None
    blocking_ops: Dict[str, float] = field(default_factory=dict)  # op of first reason -> MAC share of its groups
    blocked_top: List[tuple] = field(default_factory=list)  # (share, channels, name, reasons)
    noop_err: Optional[float] = None
    unused_err: Optional[float] = None
    killed_err: Optional[float] = None
    killed_applicable: bool = False
    dead_mode: str = ""
    dropped: int = 0
    prune: Dict[str, str] = field(default_factory=dict)  # "no-recover"/"recover" -> cell text
    errors: List[tuple] = field(default_factory=list)  # (stage, class, message, traceback)
    seconds: Dict[str, float] = field(default_factory=dict)


def _guard(row: Row, stage: str, fn):
    """Run one stage; on any exception record it (with traceback) and return None."""
    t = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # the sweep goes on whatever one model does
        tb = traceback.format_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.errors.append((stage, type(e).__name__, msg, tb))
        expected = isinstance(e, onnxprune.PruneError) and not isinstance(e, onnxprune.errors.InternalError)
        print(f"  [{row.name}] {stage}: {type(e).__name__}: {msg}", file=sys.stderr)
        if not expected:
            print(tb, file=sys.stderr)
        return None
    finally:
        row.seconds[stage] = time.perf_counter() - t


_REASON = re.compile(r"^.*? \(([A-Za-z0-9_]+)\): ")


def _op_of(reason: str) -> str:
    m = _REASON.match(reason)
    return m.group(1) if m else "?"


def measure_analysis(row: Row, model: onnx.ModelProto) -> None:
    report = analyze(model, onnxprune.PruneOptions())
    row.prunable_share = report.prunable_macs_share
    row.n_prunable = len(report.groups)
    row.n_blocked = len(report.blocked)
    row.gmacs = report.macs_before / 1e9
    ops: Dict[str, float] = collections.defaultdict(float)
    for b in report.blocked:
        # groups overlap in the MACs they touch (a conv reads one group, writes another), so
        # these shares say where blocking matters, they do not add up to 1 - prunable share
        ops[_op_of(b.reasons[0]) if b.reasons else "?"] += b.macs_share
    row.blocking_ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    row.blocked_top = sorted(((b.macs_share, b.channels, b.name, b.reasons) for b in report.blocked),
                             key=lambda r: -r[0])


def dead_channel_plans(analysis, seed: int, per_group: bool = True):
    """Plans (group -> positions to drop) that drop a random third of each prunable group's
    channels (one layer's channel spared): one plan per group and, last, all of them at once
    (only that one without ``per_group``). Returns the plans and the all-at-once plan."""
    rng = np.random.default_rng(seed)
    singles = [{g.index: sorted(rng.choice(g.size, max(1, g.size // 3), replace=False).tolist())}
               for g in analysis.prunable_groups()]
    everything = spare_one_per_layer(analysis, {k: v for p in singles for k, v in p.items()})
    plans = [spare_one_per_layer(analysis, p) for p in singles] + [everything] if per_group else [everything]
    return plans, everything


def measure_dead_channels(row: Row, model: onnx.ModelProto, x: np.ndarray, per_group: bool, seed: int) -> None:
    """Max relative output error when exactly the dead channels are pruned.

    ``unused``: no consumer reads the chosen channels, so removing them is exact
    whatever the activations. ``killed``: their producers compute zero, which
    stays zero only through zero-preserving activations (ReLU family), so it is
    only reported where the network has them.
    """
    model = expose_logits(model)
    ref = outputs(model, x)
    row.noop_err = rel_error(ref, outputs(prune_players(model, {}), x))
    _, analysis = analysis_of(model)
    groups = analysis.prunable_groups()
    if not groups:
        row.dead_mode = "no group"
        return
    # one plan per group is the test-suite's proof; on big models the one plan with
    # every group at once is kept (each plan costs two analyses and four runs)
    plans, everything = dead_channel_plans(analysis, seed, per_group)
    row.dead_mode = f"{len(plans)} plans" if per_group else "all groups at once"
    row.dropped = sum(len(v) for v in everything.values())
    row.killed_applicable = any(n.op_type in ACTIVATIONS for n in model.graph.node)
    worst_unused, worst_killed = 0.0, 0.0
    for drop in plans:
        if not any(drop.values()):
            continue
        unused = unuse_players(model, drop)
        pruned = prune_players(unused, drop)
        onnx.checker.check_model(pruned, full_check=True)
        worst_unused = max(worst_unused, rel_error(outputs(unused, x), outputs(pruned, x)))
        if row.killed_applicable:
            killed = kill_players(model, drop)
            pruned = prune_players(killed, drop)
            onnx.checker.check_model(pruned, full_check=True)
            worst_killed = max(worst_killed, rel_error(outputs(killed, x), outputs(pruned, x)))
    row.unused_err = worst_unused
    row.killed_err = worst_killed if row.killed_applicable else None


def measure_prune(row: Row, model: onnx.ModelProto, calib: np.ndarray, fresh: np.ndarray, recover: bool) -> str:
    t = time.perf_counter()
    result = onnxprune.prune(model, calib, onnxprune.PruneOptions(flops=0.3, recover=recover, holdout=0.25))
    seconds = time.perf_counter() - t
    onnx.checker.check_model(result.model, full_check=True)
    rep = result.report
    agree = "" if rep.fidelity_top1_agreement is None else f", top-1 {rep.fidelity_top1_agreement:.0%}"
    # onnxprune's fidelity is measured on the (often saturated) softmax; the logits of two
    # inputs it never saw say more about these random-weight nets
    before, after = outputs(expose_logits(model), fresh), outputs(expose_logits(result.model), fresh)
    logits = f", logit err {rel_error(before[-1:], after[-1:]):.3g}" if len(before) > len(model.graph.output) else ""
    return (f"ok: -{rep.flops_reduction:.1%} FLOPs, fid. err {rep.fidelity_relative_error:.3g}{agree}{logits}, "
            f"{seconds:.0f}s")


def run_model(name: str, args) -> Row:
    row = Row(name)
    print(f"== {name}", file=sys.stderr, flush=True)
    row.nodes_zoo = len(onnx.load(os.path.join(ZOO, MODELS[name])).graph.node)
    model = _guard(row, "build", lambda: build(name, args.seed))
    if model is None:
        return row
    row.nodes = len(model.graph.node)
    x2 = input_of(model, 2, args.seed)
    ok = _guard(row, "onnxruntime batch 2", lambda: outputs(expose_logits(model), x2))
    if ok is not None:
        row.logit_std = float(np.std(ok[-1]))
    _guard(row, "analyze", lambda: measure_analysis(row, model))
    per_group = row.gmacs is not None and row.gmacs <= args.per_group_gmacs
    _guard(row, "dead channels", lambda: measure_dead_channels(row, model, x2, per_group, args.seed))
    if not args.skip_prune:
        calib = input_of(model, args.calib, args.seed + 1)
        cell = _guard(row, "prune no-recover", lambda: measure_prune(row, model, calib, x2, False))
        row.prune["no-recover"] = cell if cell is not None else _error_cell(row, "prune no-recover")
        target_error = any(s == "prune no-recover" and c == "TargetError" for s, c, *_ in row.errors)
        if name in args.recover_models and target_error:
            # same analysis, same target: recovery cannot make more channels removable, and
            # onnxprune only finds out after calibrating (12 min on AlexNet)
            row.prune["recover"] = "skipped: TargetError without recovery"
        elif name in args.recover_models:
            cell = _guard(row, "prune recover", lambda: measure_prune(row, model, calib, x2, True))
            row.prune["recover"] = cell if cell is not None else _error_cell(row, "prune recover")
    return row


def _error_cell(row: Row, stage: str) -> str:
    for s, cls, msg, _ in row.errors:
        if s == stage:
            return f"**{cls}**: {msg[:160]}"
    return "?"


# -- the report -------------------------------------------------------------------

def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.1%}"


def _err(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.1e}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: List[Row], args, started: datetime.datetime, elapsed: float) -> str:
    cpu = _cpu_name()
    lines = [
        "# onnxprune on the onnx model-zoo corpus",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (sweep took {elapsed / 60:.1f} min)",
        f"- machine: {platform.node()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}",
        f"- command: `{' '.join(['python'] + sys.argv)}`; onnxprune at {_git_rev()}",
        f"- models: onnx/backend/test/data/light (opset 9 zoo graphs), random He-init weights "
        f"(seed {args.seed}), converted to opset {TARGET_OPSET}, batch axis made dynamic"
,
        "- prunable share: `report.prunable_macs_share` of `onnxprune.api.analyze`; blocked on: for each op "
        "named first in a blocked group's reasons, the summed MAC share of those groups (a layer is counted by "
        "every group it reads or writes, so these shares overlap and can pass 100%)",
        f"- dead channels: a third of every prunable group's players, made unused (consumers' weights zero) "
        "or killed (producers zero), then pruned; max relative error over the outputs plus the pre-softmax "
        f"logits, at batch 2; one plan per group plus all at once for models up to {args.per_group_gmacs} GMACs, "
        "else all groups at once",
        f"- prune: `onnxprune.prune(model, x, PruneOptions(flops=0.3, recover=..., holdout=0.25))` with "
        f"{args.calib} random-normal inputs; fid. err / top-1 are onnxprune's own fidelity report (softmax "
        "outputs, hold-out), logit err is the relative error of the pre-softmax logits on 2 fresh inputs",
        "",
        "| model | nodes (zoo → op13) | GMACs | prunable share | groups prunable / blocked | "
        "blocked on (op: MAC share of groups blocked first by it) | no-op err | dead err unused / killed | "
        "prune 0.3, no recover | prune 0.3, recover |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocking = ", ".join(f"{op} {share:.0%}" for op, share in r.blocking_ops.items()) or "—"
        groups = "—" if r.n_prunable is None else f"{r.n_prunable} / {r.n_blocked}"
        killed = _err(r.killed_err) if r.killed_applicable else "n/a"
        dead = "—" if r.unused_err is None else f"{_err(r.unused_err)} / {killed} ({r.dropped} players, {r.dead_mode})"
        if r.dead_mode == "no group":
            dead = "no group"
        elif any(s == "dead channels" for s, *_ in r.errors):
            dead = _error_cell(r, "dead channels")
        build_err = _error_cell(r, "build") if any(s == "build" for s, *_ in r.errors) else None
        if build_err:
            lines.append(f"| {r.name} | {r.nodes_zoo} → — | | | | build failed: {_md(build_err)} | | | | |")
            continue
        lines.append(
            f"| {r.name} | {r.nodes_zoo} → {r.nodes} | {'—' if r.gmacs is None else f'{r.gmacs:.2f}'} | "
            f"{_pct(r.prunable_share)} | {groups} | {_md(blocking)} | {_err(r.noop_err)} | {_md(dead)} | "
            f"{_md(r.prune.get('no-recover', 'skipped'))} | {_md(r.prune.get('recover', 'not run'))} |")
    lines += ["", "## Blocked groups by MAC share (top 6 per model, first two reasons)", ""]
    for r in rows:
        if not r.blocked_top:
            continue
        lines.append(f"### {r.name}")
        lines.append("")
        for share, channels, name, reasons in r.blocked_top[:6]:
            why = "; ".join(reasons[:2]) + (f"; … ({len(reasons)} reasons)" if len(reasons) > 2 else "")
            lines.append(f"- {share:.1%} `{name}` ({channels} ch): {why}")
        lines.append("")
    failures = [(r.name, e) for r in rows for e in r.errors]
    if failures:
        lines += ["## Failures", ""]
        for name, (stage, cls, msg, tb) in failures:
            lines.append(f"### {name} — {stage}: {cls}")
            lines.append("")
            lines.append("```")
            lines.extend(_tail(tb, 14))
            lines.append("```")
            lines.append("")
    lines += ["## Seconds per stage", "", "| model | " + " | ".join(_stages(rows)) + " |",
              "|---|" + "---|" * len(_stages(rows))]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(f"{r.seconds[s]:.0f}" if s in r.seconds else ""
                                                    for s in _stages(rows)) + " |")
    return "\n".join(lines) + "\n"


def _stages(rows: List[Row]) -> List[str]:
    seen: List[str] = []
    for r in rows:
        for s in r.seconds:
            if s not in seen:
                seen.append(s)
    return seen


def _tail(tb: str, n: int) -> List[str]:
    lines = tb.rstrip().splitlines()
    return lines if len(lines) <= n else ["..."] + lines[-n:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--skip-prune", action="store_true", help="only build, analyse and check dead channels")
    ap.add_argument("--recover-smallest", type=int, default=4,
                    help="also prune with recovery on this many of the selected models, smallest GMACs first")
    ap.add_argument("--per-group-gmacs", type=float, default=1.0,
                    help="dead-channel plans per group (as the test-suite does) on models up to this many GMACs")
    # a handful of samples: these are 224x224 ImageNet nets on a 2-core machine
    ap.add_argument("--calib", type=int, default=8, help="random-normal calibration inputs for prune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "corpus.md"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    # recovery is slow: run it on the smallest selected models (known MACs of the zoo graphs)
    order = sorted(names, key=lambda n: ZOO_GMACS.get(n, 1e9))
    args.recover_models = set(order[: max(args.recover_smallest, 0)])

    started = datetime.datetime.now()
    t0 = time.perf_counter()
    rows = []
    for name in names:
        rows.append(run_model(name, args))
        print(f"  {rows[-1]}"[:400], file=sys.stderr, flush=True)
    text = markdown(rows, args, started, time.perf_counter() - t0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


# MACs per 224x224 image as onnxprune counts them (Conv + Gemm), to order models
# by cost before they are built; refreshed from this script's own GMACs column
ZOO_GMACS = {"shufflenet": 0.12, "squeezenet": 0.35, "alexnet": 0.65, "inception_v1": 1.43, "zfnet512": 1.48,
             "inception_v2": 2.02, "densenet121": 2.83, "resnet50": 4.09, "vgg19": 19.63}

if __name__ == "__main__":
    sys.exit(main())
