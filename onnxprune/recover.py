"""Stage 7: refit the layers next to every cut so that they compute what they did.

Channel-level linear replacement: at each consumer's input, every removed
channel is regressed on the kept channels pixel by pixel,

    x_R ~ A x_K + b,   A = Cov_RK (Cov_KK + lambda I)^-1,   b = mean_R - A mean_K,

from the streamed first and second moments, and the regression is folded
into the consumer: the kept channels' weights absorb A^T W_R, the bias
absorbs W_R b. For 1x1 convs and fully connected layers this is exactly the
least-squares refit of the consumer's output over the kept channels; for
k x k convs it is the channel-level form (same-tap terms). A system that is
ill-conditioned falls back to folding the removed channels' means into the
bias alone, and the report says where.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import scipy.linalg

from . import weights
from .analyse import Analysis
from .calibrate import ChannelStats
from .consumers import find_consumers, from_channel_view, to_channel_view
from .data import CalibrationSet, pad_batch
from .load import free_name, names_in, readers
from .ops import rule_for
from .ops.conv import grouping
from .progress import Progress, silent
from .refit import MIN_ROWS, PATCH_LIMIT, ROWS_PER_UNKNOWN, ChannelFit, PatchFit
from .runtime import blas_single_thread, expose, keeps_shapes, make_session, run_feeds
from .segments import Frontier, MemoryBudget, Segmenter, image_rows, real_rows, rows_per_image
from .shapes import Shape

# Relative to the mean variance of the kept channels (the mean diagonal of each fit's Gram
# matrix), so the same value suits layers of any scale. Measured by scaling it 0.01x-100x for
# every fit of the default conversion (points lost on the test split / held-out relative error):
# 1e-5 to 1e-3 within 0.1 point everywhere but alexnet_mnist at -50% (0.25/0.15/0.06 points),
# 1e-2 worse on the ResNets (fmnist_resnet at -30%: 0.60 -> 0.69 points), 1e-1 worse on all (up
# to +0.8 point). 1e-3 has the lowest held-out error in 6 of the 8 cells (-30/-50% on
# fmnist_resnet, resnet20_fmnist, alexnet_mnist, mobilenetv1_fmnist); alexnet_mnist's is lower
# at 1e-2 (0.0642 -> 0.0551 at -30%, 0.0635 -> 0.0610 at -50%) with the test split within
# 0.04 point. (Those fits were shrunk toward zero; the sequential refit's now shrink toward the
# layer merely sliced, which keeps exact what slicing leaves exact: the default's 20 cells
# lost 14.19 points before and 14.08 after, each within 0.1 point. Swept again with that prior,
# at -30/-50/-70%: 1e-2, 3e-2 and 1e-1 lose more on the ResNets (fmnist_resnet at -30%: 0.57 ->
# 0.61/0.69/0.64 points, at -50%: 0.88 -> 0.91/1.06/1.14), while alexnet_mnist's held-out error
# falls (0.0639 -> 0.0477 at 1e-2 at -30%) within 0.04 point on the test split.)
RIDGE = 1e-3


@dataclass
class RecoveryLog:
    refitted: List[str] = field(default_factory=list)
    mean_only: List[str] = field(default_factory=list)  # ill-conditioned: bias correction only


def regression(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray, ridge: float = RIDGE):
    """A (R x K) and b (R,) of the ridge regression of removed channels on kept ones, or None."""
    removed = ~kept
    if cov.ndim == 1:
        return None
    ckk = cov[np.ix_(kept, kept)]
    crk = cov[np.ix_(removed, kept)]
    scale = float(np.mean(np.diag(ckk))) if kept.any() else 0.0
    if not np.isfinite(scale) or scale <= 0:
        return None
    try:
        a = scipy.linalg.solve(ckk + ridge * scale * np.eye(len(ckk)), crk.T, assume_a="pos").T
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not np.isfinite(a).all():
        return None
    b = mean[removed] - a @ mean[kept]
    return a, b


def recover(analysis: Analysis, keep_player: np.ndarray, stats: ChannelStats, ridge: float = RIDGE,
            only_ops: Optional[Sequence[str]] = None) -> RecoveryLog:
    """Refit, in place in ``analysis.graph``, every consumer that loses input channels
    (of the given op types only, when ``only_ops`` is set)."""
    log = RecoveryLog()
    kept_atom = keep_player[analysis.atom_player]
    for consumer in find_consumers(analysis):
        if only_ops is not None and consumer.node.op not in only_ops:
            continue
        atoms = consumer.channel_atoms(analysis)
        kept = kept_atom[atoms]
        if kept.all():
            continue
        s = stats[consumer.tensor]
        fit = regression(s.covariance(), s.mean, kept, ridge)
        f = consumer.channel_filters().astype(np.float64)
        f_removed = f[~kept]
        if fit is None:
            b = s.mean[~kept]
            log.mean_only.append(consumer.node.name)
        else:
            a, b = fit
            f[kept] += np.einsum("rk,rot->kot", a, f_removed)
            consumer.set_channel_filters(f)
            log.refitted.append(consumer.node.name)
        delta = np.einsum("rot,r->o", f_removed, b) * consumer.rule.tap_share(consumer.node)
        out = consumer.node.outputs[0]
        consumer.rule.add_bias(consumer.node, delta, analysis.graph)
        if consumer.node.outputs[0] is not out:  # a bias node was inserted after the layer
            analysis.cmap[consumer.node.outputs[0].name] = analysis.cmap[out.name]
            analysis.shapes[consumer.node.outputs[0].name] = analysis.shapes[out.name]
    return log


# -- sequential refit against the pruned model's own inputs ----------------------------------------

def _mini_graph(model: onnx.ModelProto, node: onnx.NodeProto, inits: Optional[Dict[str, onnx.TensorProto]] = None
                ) -> gs.Graph:
    """One node with its initializers, as a graph the op rules can edit. ``inits``: the model's
    initializers by name, where the caller already holds them (building them is a pass over
    every initializer, once per layer otherwise)."""
    if inits is None:
        inits = {t.name: t for t in model.graph.initializer}
    used = [inits[n] for n in node.input if n in inits]
    vis = [onnx.helper.make_empty_tensor_value_info(n) for n in node.input if n and n not in inits]
    g = onnx.helper.make_graph([node], "one", vis, [onnx.helper.make_empty_tensor_value_info(o) for o in node.output], used)
    return weights.import_graph(onnx.helper.make_model(g, opset_imports=model.opset_import))


def _write_back(model: onnx.ModelProto, index: int, graph: gs.Graph, shared: Optional[set] = None) -> None:
    """Copy an edited single-node graph's node and constants back into ``model``.

    ``shared``: weight-store keys that other models use; any other key of ``model`` is rebound
    to the new values in place, so the replaced weights are released at once."""
    node = graph.nodes[0]
    proto = model.graph.node[index]
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    own = set(proto.input)
    del proto.input[:]
    for t in node.inputs:
        name = t.name
        if isinstance(t, gs.Constant) and name not in own:
            # new to this node (a bias it did not have): named in a graph of its own, so the name
            # may be another tensor's here (a separate BiasAdd's "<layer>_bias")
            name = free_name(name, names_in(model))
        proto.input.append(name if name else "")
        if isinstance(t, gs.Constant):
            values = np.asarray(t.values)
            if name in inits:
                weights.assign(model.graph.initializer[inits[name]], values, shared)
            else:
                model.graph.initializer.append(weights.make_tensor(values, name))
                inits[name] = len(model.graph.initializer) - 1
    for a in proto.attribute:
        if a.name == "group":
            a.i = int(node.attrs.get("group", a.i))


def _group_of(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def _refit_candidates(pruned: onnx.ModelProto, changed: set, kind_of) -> Tuple[List[int], List[int]]:
    """Layers whose input differs from the original's (downstream of any changed node): the
    dense ones, which are refitted, and the grouped convs other than depthwise, which have no
    refit and are reported.

    Depthwise convs are neither: each output channel reads only its own input channel, which
    pruning keeps, so the refit has no lost channel to make up for, only the small error left
    upstream, and the dense layers on both sides are refitted anyway. Fitting them channel by
    channel changed little (mobilenetv1_fmnist: within 0.03 point at -30% to -60%, 0.18 point
    better without it at -70%) while the cut it needs, before the block's widest maps, made the refit of
    MobileNetV2 at 224x224 cost about twice as much. ``kind_of(name)``: "dense", "depthwise" or
    "grouped", read from the original (a depthwise conv pruned to one channel has group 1 in the
    pruned model)."""
    dirty_tensors = set()
    dense, grouped = [], []
    for i, node in enumerate(pruned.graph.node):
        dirty_in = any(n in dirty_tensors for n in node.input)
        if dirty_in and node.op_type in ("Conv", "Gemm", "MatMul"):
            kind = kind_of(node.name)
            if kind == "dense":
                dense.append(i)
            elif kind == "grouped":
                grouped.append(i)
        if dirty_in or node.name in changed:
            dirty_tensors.update(o for o in node.output if o)
    return dense, grouped


# What a layer's fit can raise on a layer shape it does not handle (a shape mismatch, a solve
# that cannot be made): that layer is left as sliced and the report says so, the others are
# fitted. Anything else is a fault of ours and ends the conversion with nothing written.
FIT_ERRORS = (ValueError, np.linalg.LinAlgError, scipy.linalg.LinAlgError, FloatingPointError)


def _reason(error: Exception) -> str:
    """What a fit raised, in a few words for the report."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:120]}" if text else type(error).__name__


@dataclass
class SequentialLog:
    patch: List[str] = field(default_factory=list)
    channel: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    unsupported: List[str] = field(default_factory=list)  # no refit: grouped convs, unreadable weights
    seconds: float = 0.0


def refit_sequential(original: onnx.ModelProto, pruned: onnx.ModelProto, keep: Callable[[str], Optional[np.ndarray]],
                     repeat: Callable[[str], int], changed: set, cal: CalibrationSet, indices: Sequence[int], providers: List[str],
                     progress: Progress = silent, ridge: float = RIDGE, seed: int = 0,
                     shapes: Optional[Dict[str, Shape]] = None) -> SequentialLog:
    """Refit, in place in ``pruned``, every dense layer whose input the pruning changed, in
    topological order, each against the original layer's output (on its kept channels) from
    the pruned model's own input with every earlier layer already refitted.

    What the original model computed does not depend on the refit: one pass of it, made with
    the pruned model's first segment, stores what every fit reads from it (:class:`_Capture`).
    The pruned model is then run segment after segment, each fit taking its layer's input at
    the cut before its step (:func:`_waves`: layers whose inputs are made before a step share
    it). ``keep(tensor)`` is the pruning mask of a tensor of ``original`` (None:
    all kept); ``changed`` names the nodes the surgery edited; ``shapes``: the original's
    static shapes, where known."""
    start_time = time.perf_counter()
    log = SequentialLog()
    dims = {t.name: tuple(t.dims) for t in original.graph.initializer}  # dims: stored weights too
    o_nodes = {n.name: n for n in original.graph.node}

    def kind_of(name):
        node = o_nodes.get(name)
        if node is None or node.op_type != "Conv":
            return "dense"
        return grouping(_group_of(node), dims.get(node.input[1]) if len(node.input) > 1 else None)

    layers, grouped = _refit_candidates(pruned, changed, kind_of)
    log.unsupported = [pruned.graph.node[i].name for i in grouped]
    if not layers:
        return log
    names = [pruned.graph.node[i].name for i in layers]
    biases = _add_bias_nodes(pruned, names)
    position = {node.name: i for i, node in enumerate(pruned.graph.node)}
    layers = [position[name] for name in names]
    o_inits = {t.name: weights.array(t) for t in original.graph.initializer}  # shared, not copied
    shared = weights.keys(original) if weights.active() is not None else None
    shapes = shapes or {}
    indices = np.asarray(indices)
    n = len(indices)
    waves = _waves(pruned, layers)
    seg = Segmenter(pruned, [names[wave[0]] for wave in waves])
    lives = [seg.live_at(cut) for cut in seg.cuts]
    live_sets = [set(live) for live in lives]
    uses = _output_uses(original, o_nodes, names, keep, shapes,
                        {names[k]: live_sets[step] for step, wave in enumerate(waves) for k in wave})
    # what each fit reads from the original is stored before the first is made: the patch fits
    # are made now (they hold no weights, and they draw the rows they are fitted against); the
    # channel fits, which copy their layer's weights, at their turn; other layers get no fit
    patch_fits = {name: _patch_fit(o_nodes[name], o_inits, keep, n, seed + step,
                                   RELU_STEPS if uses[name].relu else 0)
                  for step, name in enumerate(names)}
    channel_weights = {}  # layer -> (rule, one-node graph node) over views of its weights; the fit copies them at its turn
    o_protos = {t.name: t for t in original.graph.initializer}
    for name in names:
        readable = None if patch_fits[name] is not None else _channel_weights(original, o_nodes[name], o_protos,
                                                                                 shapes)
        if readable is not None:
            channel_weights[name] = readable
    # axis 0 of a tensor crossing a cut is not always the batch: a MatMul's (N x H x W, C) input
    # has H x W rows per image, a shape or a scalar is the batch's as a whole
    rows = rows_per_image(original, cal.spec.name, cal.sample_shape, cal.spec.fixed_batch,
                          None if cal.spec.fixed_batch else shapes)
    bs = cal.batch_size
    folder = tempfile.mkdtemp(prefix="onnxprune-")
    budget = MemoryBudget()
    targets = {name: Frontier(folder, budget) for name in names}
    prev = new = None
    prev_live = [cal.spec.name]
    start = 0
    try:
        with progress("refitting layers", len(layers)) as update, blas_single_thread():
            for step, wave in enumerate(waves):
                fits = {}
                broken = {}  # layer -> why its fit raised: left as sliced, as an ill-conditioned one
                for k in wave:
                    name = names[k]
                    fits[name] = patch_fits[name] or (_channel_fit(*channel_weights[name], o_nodes[name], keep, repeat)
                                                      if name in channel_weights else None)
                inputs = {names[k]: pruned.graph.node[layers[k]].input[0] for k in wave}
                live = lives[step]
                sess = make_session(seg.segment(pruned, start, seg.cuts[step], prev_live, live), providers, ours=True)
                capture = (_Capture(original, o_nodes, patch_fits, set(channel_weights), targets, providers, shapes,
                                    bool(cal.spec.fixed_batch), rows, uses) if step == 0 else None)
                new = Frontier(folder, budget)
                # a fixed-batch model's runs, and every run on the CUDA provider (runtime.keeps_shapes),
                # take whole batches: the last one padded
                steady = bs if cal.spec.fixed_batch else (min(bs, n) if keeps_shapes(sess) else 0)
                for b0 in range(0, n, bs):
                    real = min(bs, n - b0)
                    images = steady or real  # in this batch's runs
                    if prev is None:
                        batch = pad_batch(next(cal.batches(indices[b0:b0 + real])), steady)
                        capture.run(cal.spec.name, batch, b0, real)
                        feeds = {cal.spec.name: batch}
                    else:
                        feeds = {t: prev.read(t, b0, b0 + real) for t in prev_live}
                        if steady:  # the frontiers keep the real rows only
                            feeds = {t: pad_batch(v, steady * rows[t]) if rows[t] else v for t, v in feeds.items()}
                    outs = dict(zip(live, run_feeds(sess, feeds, live)))
                    for t in live:  # the rows of the real images, which the frontier and the fits take
                        r = image_rows(rows, t, outs[t], images)
                        outs[t] = real_rows(outs[t], r, real)
                        new.write(t, b0, outs[t], r)
                    for name, fit in fits.items():
                        if fit is None or name in broken:
                            continue
                        x_new = outs[inputs[name]]
                        try:
                            if isinstance(fit, PatchFit):
                                pos = (targets[name].read("positions", b0, b0 + real)
                                       if targets[name].has("positions") else None)
                                skip = uses[name].skip
                                skip = fit.skip_rows(outs[skip], pos) if skip is not None else None
                                fit.add(targets[name].read("rows", b0, b0 + real), pos, x_new, skip)
                            else:
                                fit.add(targets[name].read("input", b0, b0 + real), x_new)
                        except FIT_ERRORS as e:
                            broken[name] = _reason(e)
                for k in wave:
                    name = names[k]
                    fit = fits.pop(name)
                    targets[name].close()
                    solved = None
                    if fit is not None and name not in broken:
                        try:
                            solved = fit.solve(ridge)
                        except FIT_ERRORS as e:
                            broken[name] = _reason(e)
                    if fit is None:
                        log.unsupported.append(name)
                    elif solved is None:
                        log.failed.append(name + (f" ({broken[name]})" if name in broken else ""))
                    else:
                        _apply(pruned, layers[k], solved, fit, shared, biases.get(name))
                        (log.channel if isinstance(fit, ChannelFit) else log.patch).append(name)
                    # a fit holds its Gram matrices, a channel fit a copy of its layer's weights
                    # too: let them go before the next is made
                    patch_fits[name] = fit = solved = None
                    channel_weights.pop(name, None)
                sess = capture = None
                if prev is not None:
                    prev.close()
                prev, prev_live, start, new = new, live, seg.cuts[step], None
                update(len(wave))
        _drop_zero_biases(pruned, biases)
    finally:
        # an error mid-step leaves the frontier being written unclosed too
        for f in [prev, new] + list(targets.values()):
            if f is not None:
                f.close()
        shutil.rmtree(folder, ignore_errors=True)
    log.seconds = time.perf_counter() - start_time
    return log


# The capture pass runs the whole original model with what the fits read exposed; where one
# image's largest activation is large, a batch goes through it in runs of fewer images, whose
# largest activation takes at most this many bytes. At 224x224 (256 images, batches of 32):
# MobileNetV2 (4.8 MB per image for its largest map: runs of 6) refit 2.9 -> 2.5 s, its peak
# memory 2.33 -> 1.05 GB (onnxruntime's plain pass too is 15-20% faster in batches of 4 to 8
# than of 32 there); ResNet-18 (runs of 10) 1.84 -> 1.39 GB, time unchanged.
CAPTURE_RUN_BYTES = 32 * 2 ** 20


class _Capture:
    """One pass of the original model that stores, batch by batch, what each layer's fit reads
    from it: a patch fit's rows of the layer's output, a channel fit's whole input.

    A patch fit's rows are taken inside the graph where the output's shape is known (a
    GatherElements at positions fed with the batch, one (N, 1, P) index per layer expanded
    over the channels there): onnxruntime then hands over a few rows per image, not every
    layer's output at once, which for a deep network at 224x224 would take gigabytes per
    batch."""

    def __init__(self, original: onnx.ModelProto, o_nodes, patch_fits: Dict[str, Optional[PatchFit]],
                 channel_layers: set, targets: Dict[str, Frontier], providers: List[str], shapes: Dict[str, Shape],
                 fixed_batch: bool, rows: Dict[str, int], uses: Dict[str, "_OutputUse"]):
        """``rows``: rows of axis 0 per image of the original's tensors (:func:`rows_per_image`);
        ``uses``: what each patch fit is fitted against (:func:`_output_uses`)."""
        self.patch_fits, self.targets, self.rows = patch_fits, targets, rows
        largest = max((int(np.prod(s[1:])) for s in shapes.values() if len(s) > 1 and None not in s[1:]), default=0)
        # a batch in runs of fewer images where activations are large (a fixed batch axis cannot
        # be split): see CAPTURE_RUN_BYTES
        self.images_per_run = None if fixed_batch or not largest else max(1, CAPTURE_RUN_BYTES // (4 * largest))
        self.read = {name: uses[name].target for name, fit in patch_fits.items() if fit is not None}
        self.read.update({name: o_nodes[name].input[0] for name in channel_layers})
        self.gathered: Dict[str, Tuple[str, str, int]] = {}  # layer -> (positions in, rows out, H * W)
        nodes, inputs, inits = [], [], []
        taken = names_in(original)
        flat = free_name("onnxprune_flat_shape", taken)
        for name, fit in patch_fits.items():
            shape = shapes.get(self.read[name]) if fit is not None else None
            # GatherElements is opset 11, the oldest that load() accepts
            if shape is None or len(shape) != 4 or None in shape[1:]:
                continue
            c, hw = int(shape[1]), int(shape[2] * shape[3])
            if fit.rows_per_image >= hw:
                continue  # every position: the output itself
            pos, wide, y3, rows, channels = (free_name(f"{self.read[name]}_{suffix}", taken)
                                             for suffix in ("positions", "positions_wide", "flat", "rows", "channels"))
            inits.append(weights.make_tensor(np.array([1, c, 1], dtype=np.int64), channels))
            nodes += [onnx.helper.make_node("Reshape", [self.read[name], flat], [y3]),
                      onnx.helper.make_node("Expand", [pos, channels], [wide]),
                      onnx.helper.make_node("GatherElements", [y3, wide], [rows], axis=2)]
            inputs.append(onnx.helper.make_tensor_value_info(pos, onnx.TensorProto.INT64, [None, 1, None]))
            self.gathered[name] = (pos, rows, hw)
        self.outputs = list(dict.fromkeys([self.gathered[n][1] if n in self.gathered else t for n, t in self.read.items()]))
        model = expose(original, self.outputs)
        if nodes:
            model.graph.node.extend(nodes)
            model.graph.input.extend(inputs)
            model.graph.initializer.extend(inits + [weights.make_tensor(np.array([0, 0, -1], dtype=np.int64), flat)])
        self.session = make_session(model, providers, ours=True)
        self.steady = keeps_shapes(self.session)  # runs of one size, the last one padded

    def run(self, input_name: str, batch: np.ndarray, b0: int, real: int) -> None:
        # at most the batch: on small inputs the memory bound allows hundreds of images a run
        step = min(self.images_per_run or len(batch), len(batch))
        if self.steady:
            batch = pad_batch(batch, -(-len(batch) // step) * step)
        feeds, drawn = {input_name: batch}, {}
        for name, (pos_in, _, hw) in self.gathered.items():
            pos = drawn[name] = self.patch_fits[name].positions(real, hw)
            if len(batch) > real:  # a padded batch (fixed-batch models, keeps_shapes): any position for the padding
                pos = np.concatenate([pos, np.zeros((len(batch) - real, pos.shape[1]), dtype=pos.dtype)])
            feeds[pos_in] = pos[:, None, :]
        runs = [run_feeds(self.session, {k: v[i:i + step] for k, v in feeds.items()}, self.outputs)
                for i in range(0, len(batch), step)]
        outs = {t: np.concatenate([r[j] for r in runs]) if len(runs) > 1 else runs[0][j] for j, t in enumerate(self.outputs)}
        for name, tensor in self.read.items():
            fit, store = self.patch_fits.get(name), self.targets[name]
            if fit is None:
                y = outs[tensor]
                r = image_rows(self.rows, tensor, y, len(batch))
                store.write("input", b0, real_rows(y, r, real), r)
                continue
            if name in self.gathered:
                rows, pos = fit.rows(outs[self.gathered[name][1]][:real]), drawn[name]
            else:  # every position, or the output's shape was not known
                rows, pos = fit.targets(outs[tensor][:real])
            store.write("rows", b0, rows)
            if pos is not None:
                store.write("positions", b0, pos)


# majorize-minimize steps on the error after a Relu (PatchFit._relu_steps). alexnet_mnist at
# -50%, held-out error and refit time for 0/1/2/3 steps: 0.0729/0.0660/0.0635/0.0622 and
# 0.28/0.33/0.40/0.44 s; resnet20_fmnist 0.0978/0.0945/0.0939/0.0937, 0.38/0.43/0.45/0.51 s.
RELU_STEPS = 2


@dataclass
class _OutputUse:
    """What a patch fit matches: ``target``, a tensor of the original (the layer's output, or
    its sum with ``skip`` where the layer's output goes into nothing but that Add); ``relu``:
    ``target`` goes into nothing but a Relu."""
    target: str
    skip: Optional[str] = None
    relu: bool = False


def _output_uses(original: onnx.ModelProto, o_nodes: Dict[str, onnx.NodeProto], names: Sequence[str], keep,
                 shapes: Dict[str, Shape], live: Dict[str, set]) -> Dict[str, _OutputUse]:
    """Per layer to refit, what its fit matches. A residual block's last conv is fitted
    against the block's sum less the pruned model's skip tensor, so that it makes up for the
    error the skip path carries as well as its own; this needs the skip tensor from the run
    that feeds the layer's fit (``live[name]``: the tensors there) with the layer's kept
    channels, and both addends of the same static shape (no broadcast)."""
    read_by = readers(original.graph)
    outputs = {o.name for o in original.graph.output}
    constants = {t.name for t in original.graph.initializer}

    def only_reader(tensor):  # the one node that reads ``tensor``, once (an Add(x, x) reads it twice)
        found = read_by.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in outputs else None

    def same_mask(a, b):
        ka, kb = keep(a), keep(b)
        return (ka is None and kb is None) or (ka is not None and kb is not None and np.array_equal(ka, kb))

    uses = {}
    for name in names:
        out = o_nodes[name].output[0]
        use = _OutputUse(out)
        add = only_reader(out)
        if add is not None and add.op_type == "Add" and len(add.input) == 2:
            other = add.input[1] if add.input[0] == out else add.input[0]
            shape = shapes.get(out)
            if (other not in constants and other in live.get(name, ()) and shape is not None
                    and None not in shape and shapes.get(other) == shape and same_mask(out, other)):
                use = _OutputUse(add.output[0], other)
        after = only_reader(use.target)
        use.relu = after is not None and after.op_type == "Relu"
        uses[name] = use
    return uses


def _waves(model: onnx.ModelProto, layers: Sequence[int]) -> List[List[int]]:
    """The refit's steps: runs of consecutive layers (positions in ``layers``, node indices in
    topological order) fitted from one run of one segment. A layer joins the step before it
    when its input is made before that step's first layer: the refits in the step do not
    change it, so it is the same there as at the layer itself, and a cut of its own would
    only run the step's layers again and copy every tensor crossing the cut once more. The
    1x1 projection of a residual block joins the block's first conv; the branches of an
    Inception module reading one input share one step."""
    made_at = {o: i for i, node in enumerate(model.graph.node) for o in node.output if o}
    waves: List[List[int]] = []
    for k, index in enumerate(layers):
        if waves and made_at.get(model.graph.node[index].input[0], -1) < layers[waves[-1][0]]:
            waves[-1].append(k)
        else:
            waves.append([k])
    return waves


def _add_bias_nodes(model: onnx.ModelProto, names: Sequence[str]) -> Dict[str, str]:
    """A zero bias Add after each layer to refit whose op has no bias of its own (a MatMul:
    ``Rule.bias`` is None), so that its fit has a bias to set. It must be in the model before
    the segments are cut, so that the layers after it are fitted on what it computes with its
    bias. Returns layer name -> bias initializer name."""
    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    taken = names_in(model)
    nodes, biases = [], {}
    for node in model.graph.node:
        nodes.append(node)
        w = inits.get(node.input[1]) if node.name in wanted and len(node.input) > 1 else None
        if w is None:
            continue
        rule, g_node = rule_for(node.op_type, node.domain), _mini_graph(model, node, inits).nodes[0]
        filters = rule.filters(g_node)
        # a weight the op rule cannot read: the layer gets no fit either
        if filters is None or rule.bias(g_node) is not None:
            continue
        out, pre, bias = node.output[0], free_name(f"{node.output[0]}_before_bias", taken), free_name(f"{node.name}_bias", taken)
        model.graph.initializer.append(weights.make_tensor(np.zeros(len(filters), weights.numpy_dtype(w)), bias))
        node.output[0] = pre
        nodes.append(onnx.helper.make_node("Add", [pre, bias], [out], name=free_name(f"{node.name}_bias_add", taken)))
        biases[node.name] = bias
    if biases:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return biases


def _drop_zero_biases(model: onnx.ModelProto, biases: Dict[str, str]) -> None:
    """Remove the bias Adds of :func:`_add_bias_nodes` that no fit set (a failed solve): the
    layer before each writes the Add's output again."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    zero = {b for b in biases.values() if not np.any(weights.array(model.graph.initializer[inits[b]]))}
    if not zero:
        return
    adds = {n.input[0]: n.output[0] for n in model.graph.node
            if n.op_type == "Add" and len(n.input) == 2 and n.input[1] in zero}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and node.input[1] in zero:
            continue
        if node.output and node.output[0] in adds:
            node.output[0] = adds[node.output[0]]
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    for i in sorted((inits[b] for b in zero), reverse=True):
        del model.graph.initializer[i]


def _patch_fit(node_o: onnx.NodeProto, inits, keep, images: int, seed: int, relu_steps: int = 0) -> Optional[PatchFit]:
    """The exact fit of a dense 2-D Conv whose im2col rows (kept inputs x taps) are at most
    PATCH_LIMIT wide, with ROWS_PER_UNKNOWN rows per unknown (MIN_ROWS at least) over
    ``images``; None for any other layer."""
    w = inits.get(node_o.input[1]) if node_o.op_type == "Conv" and len(node_o.input) > 1 else None
    if w is None or w.ndim != 4:
        return None
    keep_in, keep_out = keep(node_o.input[0]), keep(node_o.output[0])
    in_mask = np.ones(w.shape[1], dtype=bool) if keep_in is None else keep_in
    out_mask = np.ones(w.shape[0], dtype=bool) if keep_out is None else keep_out
    width = int(in_mask.sum()) * int(np.prod(w.shape[2:]))
    if width > PATCH_LIMIT:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node_o.attribute}
    rows = max(ROWS_PER_UNKNOWN * (width + 1), MIN_ROWS)
    bias = inits.get(node_o.input[2]) if len(node_o.input) > 2 and node_o.input[2] else None
    return PatchFit(w.shape[2:], attrs, in_mask, out_mask, rows_per_image=_per_image(rows, images),
                    seed=seed, relu_steps=relu_steps, prior=(w, bias))


def _channel_weights(original: onnx.ModelProto, node_o: onnx.NodeProto, inits: Dict[str, onnx.TensorProto],
                     shapes: Dict[str, Shape]):
    """(rule, the layer as a one-node graph's node) of a layer whose weights the op rule can read
    per input channel and per output channel, or None (a MatMul's batched weight, a weight that
    is not an initializer, a MatMul whose input is not known to be (rows, features): the fit
    reads channels on axis 1, and a sequence head's (N, L, F) has its features last).
    ``inits``: ``original``'s initializers by name; ``shapes``: its static shapes."""
    if len(node_o.input) < 2 or inits.get(node_o.input[1]) is None:
        return None
    if node_o.op_type == "MatMul" and len(shapes.get(node_o.input[0]) or ()) != 2:
        return None
    g_node = _mini_graph(original, node_o, inits).nodes[0]
    rule = rule_for(node_o.op_type, node_o.domain)
    if rule.filters(g_node) is None or rule.input_filters(g_node) is None:
        return None
    return rule, g_node


def _channel_fit(rule, g_node: gs.Node, node_o: onnx.NodeProto, keep, repeat) -> ChannelFit:
    """The channel-level fit of a layer that sums over its input channels, from its
    :func:`_channel_weights`."""
    keep_out = keep(node_o.output[0])
    out_mask = np.ones(len(rule.filters(g_node)), dtype=bool) if keep_out is None else keep_out
    bias = rule.bias(g_node)
    bias = np.zeros(int(out_mask.sum())) if bias is None else bias[out_mask]
    filters = np.asarray(rule.input_filters(g_node))
    if not out_mask.all():
        filters = filters[:, out_mask]
    r = repeat(node_o.input[0])
    keep_in = keep(node_o.input[0])
    return ChannelFit(to_channel_view(filters, r), bias, r, None if keep_in is None else keep_in[::r])


def _per_image(rows: int, images: int) -> int:
    """Sampled rows each image gives so that ``images`` give at least ``rows``."""
    return max(1, -(-rows // max(images, 1)))


def _apply(pruned: onnx.ModelProto, index: int, solved, fit, shared: Optional[set] = None,
           bias_name: Optional[str] = None) -> None:
    """Write a solved fit into layer ``index``; ``bias_name``: the initializer that holds its bias
    where the layer has none of its own (see :func:`_add_bias_nodes`)."""
    node = pruned.graph.node[index]
    graph = _mini_graph(pruned, node)
    g_node = graph.nodes[0]
    rule = rule_for(node.op_type, node.domain)
    new_w, bias = solved
    if isinstance(fit, PatchFit):  # (out, in, kh, kw) -> input filters (in, out, taps)
        new_w = np.moveaxis(new_w, 1, 0).reshape(new_w.shape[1], new_w.shape[0], -1)
    else:
        new_w = from_channel_view(new_w, fit.repeat)
    rule.set_input_filters(g_node, new_w)
    if bias_name is not None:
        tensor = next(t for t in pruned.graph.initializer if t.name == bias_name)
        weights.assign(tensor, np.asarray(bias, weights.numpy_dtype(tensor)), shared)
    else:
        rule.add_bias(g_node, bias - rule.bias(g_node), graph)
    _write_back(pruned, index, graph, shared)
