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
from .ops import rule_for
from .ops.conv import grouping
from .progress import Progress, silent
from .refit import PATCH_LIMIT, ROWS_PER_UNKNOWN, ChannelFit, PatchFit
from .runtime import blas_single_thread, make_session, run_feeds
from .segments import Frontier, MemoryBudget, Segmenter
from .shapes import Shape

RIDGE = 1e-3  # relative to the mean variance of the kept channels


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
        delta = np.einsum("rot,r->o", f_removed, b)
        out = consumer.node.outputs[0]
        consumer.rule.add_bias(consumer.node, delta, analysis.graph)
        if consumer.node.outputs[0] is not out:  # a bias node was inserted after the layer
            analysis.cmap[consumer.node.outputs[0].name] = analysis.cmap[out.name]
            analysis.shapes[consumer.node.outputs[0].name] = analysis.shapes[out.name]
    return log


# -- sequential refit against the pruned model's own inputs ----------------------------------------

def _mini_graph(model: onnx.ModelProto, node: onnx.NodeProto) -> gs.Graph:
    """One node with its initializers, as a graph the op rules can edit."""
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
    del proto.input[:]
    for t in node.inputs:
        proto.input.append(t.name if t.name else "")
        if isinstance(t, gs.Constant):
            values = np.asarray(t.values)
            if t.name in inits:
                weights.assign(model.graph.initializer[inits[t.name]], values, shared)
            else:
                model.graph.initializer.append(weights.make_tensor(values, t.name))
                inits[t.name] = len(model.graph.initializer) - 1
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


@dataclass
class SequentialLog:
    patch: List[str] = field(default_factory=list)
    channel: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    unsupported: List[str] = field(default_factory=list)  # no refit for this layer kind (grouped convs)
    seconds: float = 0.0


def refit_sequential(original: onnx.ModelProto, pruned: onnx.ModelProto, keep: Callable[[str], Optional[np.ndarray]],
                     repeat: Callable[[str], int], changed: set, cal: CalibrationSet, indices: Sequence[int], providers: List[str],
                     progress: Progress = silent, ridge: float = RIDGE, seed: int = 0,
                     shapes: Optional[Dict[str, Shape]] = None) -> SequentialLog:
    """Refit, in place in ``pruned``, every dense layer whose input the pruning changed, in
    topological order, each against the original layer's output (on its kept channels) from
    the pruned model's own input with every earlier layer already refitted.

    ``keep(tensor)`` is the pruning mask of a tensor of ``original`` (None: all kept);
    ``changed`` names the nodes the surgery edited; ``shapes``: the original's static shapes
    (a tensor of unknown shape is taken as larger than any other)."""
    start_time = time.perf_counter()
    log = SequentialLog()
    original = onnx.shape_inference.infer_shapes(_in_order_of(original, pruned))
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
    per_image = _per_image_sizes(shapes or {})
    shared = weights.keys(original) if weights.active() is not None else None
    seg_o, seg_p = Segmenter(original, names), Segmenter(pruned, names)
    bs = cal.batch_size
    indices = np.asarray(indices)
    n = len(indices)
    folder = tempfile.mkdtemp(prefix="onnxprune-")
    budget = MemoryBudget()
    prev_o = prev_p = new_o = new_p = None
    prev_live_o = prev_live_p = [cal.spec.name]
    start_o = start_p = 0
    try:
        with progress("refitting layers", len(layers)) as update, blas_single_thread():
            for step, (layer_index, name) in enumerate(zip(layers, names)):
                node_p = pruned.graph.node[layer_index]
                node_o = o_nodes[name]
                fit = _make_fit(original, node_o, o_inits, keep, repeat, n, seed + step, per_image)
                # a fit that reads the original layer's output: the original model's segment ends
                # after the layer (the next one starts there), the pruned model's before it
                reads_output = isinstance(fit, PatchFit) and fit.reads_output
                stop_o = seg_o.cuts[step] + (1 if reads_output else 0)
                live_o, live_p = seg_o.live_at(stop_o), seg_p.live_at(seg_p.cuts[step])
                wanted_o = node_o.output[0] if reads_output else node_o.input[0]
                outputs_o = live_o + ([wanted_o] if wanted_o not in live_o else [])
                sess_o = make_session(seg_o.segment(original, start_o, stop_o, prev_live_o, outputs_o), providers)
                sess_p = make_session(seg_p.segment(pruned, start_p, seg_p.cuts[step], prev_live_p, live_p), providers)
                new_o, new_p = Frontier(folder, budget), Frontier(folder, budget)
                for b0 in range(0, n, bs):
                    real = min(bs, n - b0)
                    if prev_o is None:
                        batch = next(cal.batches(indices[b0:b0 + real]))
                        feeds_o = {cal.spec.name: batch}
                        feeds_p = {cal.spec.name: batch}
                    else:
                        feeds_o = {t: prev_o.read(t, b0, b0 + real) for t in prev_live_o}
                        feeds_p = {t: prev_p.read(t, b0, b0 + real) for t in prev_live_p}
                        if cal.spec.fixed_batch:  # the frontiers keep the real rows only
                            feeds_o = {t: pad_batch(v, bs) for t, v in feeds_o.items()}
                            feeds_p = {t: pad_batch(v, bs) for t, v in feeds_p.items()}
                    outs_o = dict(zip(outputs_o, run_feeds(sess_o, feeds_o, outputs_o)))
                    outs_p = dict(zip(live_p, run_feeds(sess_p, feeds_p, live_p)))
                    for frontier, outs, live in ((new_o, outs_o, live_o), (new_p, outs_p, live_p)):
                        for t in live:
                            v = outs[t]
                            # a padded last batch (fixed-batch models) is copied: a view would keep,
                            # uncounted by the memory budget, the whole padded array alive
                            frontier.write(t, b0, v if real == len(v) else v[:real].copy())
                    if fit is not None:
                        fit.add(outs_o[wanted_o][:real], outs_p[node_p.input[0]][:real])
                solved = fit.solve(ridge) if fit is not None else None
                if fit is None:
                    log.unsupported.append(name)
                elif solved is None:
                    log.failed.append(name)
                else:
                    _apply(pruned, layer_index, solved, fit, shared, biases.get(name))
                    (log.channel if isinstance(fit, ChannelFit) else log.patch).append(name)
                # a fit holds a copy of its layer's weights: let it go before the next is made
                fit = solved = sess_o = sess_p = None
                for f in (prev_o, prev_p):
                    if f is not None:
                        f.close()
                prev_o, prev_p, prev_live_o, prev_live_p = new_o, new_p, live_o, live_p
                start_o, start_p = stop_o, seg_p.cuts[step]
                new_o = new_p = None
                update(1)
        _drop_zero_biases(pruned, biases)
    finally:
        # an error mid-step leaves the frontiers being written open too: close their files
        # before the folder goes (an open file cannot be deleted everywhere)
        for f in (prev_o, prev_p, new_o, new_p):
            if f is not None:
                f.close()
        shutil.rmtree(folder, ignore_errors=True)
    log.seconds = time.perf_counter() - start_time
    return log


def _add_bias_nodes(model: onnx.ModelProto, names: Sequence[str]) -> Dict[str, str]:
    """A zero bias Add after each layer to refit whose op has no bias input (a MatMul: see
    ``Rule.has_bias_input``), so that its fit has a bias to set. It must be in the model before
    the segments are cut, so that the layers after it are fitted on what it computes with its
    bias. Returns layer name -> bias initializer name."""
    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    taken = set(inits) | {o for n in model.graph.node for o in list(n.output) + list(n.input)} | {n.name for n in model.graph.node}

    def fresh(name: str) -> str:
        base, i = name, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    nodes, biases = [], {}
    for node in model.graph.node:
        nodes.append(node)
        w = inits.get(node.input[1]) if node.name in wanted and len(node.input) > 1 else None
        rule = rule_for(node.op_type, node.domain)
        if w is None or rule.has_bias_input:
            continue
        filters = rule.filters(_mini_graph(model, node).nodes[0])
        if filters is None:  # a weight the op rule cannot read: the layer gets no fit either
            continue
        out, pre, bias = node.output[0], fresh(f"{node.output[0]}_before_bias"), fresh(f"{node.name}_bias")
        model.graph.initializer.append(weights.make_tensor(np.zeros(len(filters), weights.numpy_dtype(w)), bias))
        node.output[0] = pre
        nodes.append(onnx.helper.make_node("Add", [pre, bias], [out], name=fresh(f"{node.name}_bias_add")))
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


def _in_order_of(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its nodes in ``reference``'s order, so that cuts made by
    node name fall at the same places in both (they share topology and node names)."""
    rank = {n.name: i for i, n in enumerate(reference.graph.node)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = sorted(out.graph.node, key=lambda n: rank.get(n.name, -1))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _make_fit(original: onnx.ModelProto, node_o: onnx.NodeProto, inits, keep, repeat, images: int, seed: int,
              per_image: Dict[str, int]):
    """The fit of one layer. ``per_image``: elements per image of the tensors whose shape is known."""
    w = inits.get(node_o.input[1])
    if w is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node_o.attribute}
    keep_out = keep(node_o.output[0])
    keep_in = keep(node_o.input[0])
    graph = _mini_graph(original, node_o)
    rule = rule_for(node_o.op_type, node_o.domain)
    out_filters = rule.filters(graph.nodes[0])
    if out_filters is None:  # a weight the op rule cannot read (a MatMul's batched weight)
        return None
    out_mask = np.ones(len(out_filters), dtype=bool) if keep_out is None else keep_out
    bias = rule.bias(graph.nodes[0])
    bias = np.zeros(int(out_mask.sum())) if bias is None else bias[out_mask]
    if node_o.op_type == "Conv" and w.ndim == 4:
        in_mask = np.ones(w.shape[1], dtype=bool) if keep_in is None else keep_in
        taps = int(np.prod(w.shape[2:]))
        if int(in_mask.sum()) * taps <= PATCH_LIMIT:
            rows = ROWS_PER_UNKNOWN * (int(in_mask.sum()) * taps + 1)
            size_in, size_out = per_image.get(node_o.input[0]), per_image.get(node_o.output[0])
            # where the output is larger, the original model keeps the layer's input between
            # segments and the fit computes the output from it
            layer = ((w[out_mask].reshape(int(out_mask.sum()), -1), bias)
                     if size_in is None or size_out is None or size_out > size_in else None)
            return PatchFit(w.shape[2:], attrs, in_mask, out_mask, rows_per_image=_per_image(rows, images), seed=seed,
                            layer=layer)
    filters = rule.input_filters(graph.nodes[0])
    if filters is None:
        return None
    filters = np.asarray(filters)
    if not out_mask.all():
        filters = filters[:, out_mask]
    r = repeat(node_o.input[0])
    keep_channels = None if keep_in is None else keep_in[::r]
    return ChannelFit(to_channel_view(filters, r), bias, r, keep_channels)


def _per_image_sizes(shapes: Dict[str, Shape]) -> Dict[str, int]:
    """Elements per image of each tensor whose shape is known beyond its batch axis."""
    return {name: int(np.prod(shape[1:])) for name, shape in shapes.items()
            if len(shape) >= 2 and None not in shape[1:]}


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
