"""Latency as a function of channel counts, from timing each prunable layer at candidate widths.

For ``--latency R`` the allocation needs the model's latency for any choice of
kept channels. Each layer that MAC counting knows (Conv of any grouping,
ConvTranspose, Gemm, 2-D MatMul) is rebuilt alone, with random weights, at a
small grid of input and output widths (the widths the allocation can choose:
multiples of --round-to between the --min-keep floor and the full width), and
timed on the target provider at the given batch size. Between grid points the
latency is interpolated (linearly in one width, bilinearly in two). The rest of
the model (activations, pooling, additions) is the measured latency of the
whole model minus the layers' sum, and is held constant, so the target is met
by the layers alone: conservative, since the rest shrinks with the channels too.
Layers that cannot be rebuilt alone are costed at the median time per MAC of
those that were timed.

:class:`LatencyModel` has the interface of :class:`onnxprune.allocate.MacModel`
(``counts``, ``macs_of_counts``, ``macs``, ``per_player``), with costs in
nanoseconds, so the allocation runs on it unchanged.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from scipy.interpolate import RegularGridInterpolator

from .allocate import MacModel
from .analyse import Analysis
from .ops.base import attr, const
from .runtime import make_session

RUNS, MIN_SECONDS = 7, 0.05


def _median_seconds(model: onnx.ModelProto, feed: dict, providers: Sequence[str]) -> float:
    sess = make_session(model, providers)
    sess.run(None, feed)  # warm-up
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < RUNS or (time.perf_counter() - start < MIN_SECONDS and len(times) < 50):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _grid(full: int, prunable: bool, unit: int, min_keep: float) -> List[int]:
    if not prunable or full <= 1:
        return [full]
    u = unit if unit > 1 and full >= unit else 1
    floor = max(1, math.ceil(min_keep * full - 1e-9))
    points = {full}
    for share in (floor / full, 0.25, 0.5, 0.75):
        k = min(full, max(u, int(math.ceil(share * full / u)) * u))
        points.add(k)
    return sorted(points)


def _single_layer(node: gs.Node, shapes: dict, batch: int, widths: dict, opset: int,
                  ir_version: int) -> Optional[onnx.ModelProto]:
    """``node`` alone with the given channel counts of its input and output (random weights),
    or None for a layer this cannot rebuild."""
    x, y = node.inputs[0], node.outputs[0]
    w = const(node.inputs[1]) if len(node.inputs) > 1 else None
    shape = shapes.get(x.name)
    if w is None or shape is None or any(d is None for d in shape[1:]):
        return None
    cin, cout = widths.get(x.name), widths.get(y.name)
    rng = np.random.default_rng(0)
    attrs = {k: v for k, v in node.attrs.items()}
    if node.op in ("Conv", "ConvTranspose"):
        group = int(attr(node, "group", 1))
        full_in = shape[1]
        full_out = w.shape[0] if node.op == "Conv" else w.shape[1] * group
        cin = full_in if cin is None else cin
        cout = full_out if cout is None else cout
        if group == full_in == full_out:  # depthwise: one width
            cin = cout = group = cin if x.name in widths else cout
        elif group > 1 and (cin % group or cout % group):
            return None
        attrs["group"] = group
        if node.op == "Conv":
            wshape = (cout, cin // group) + tuple(w.shape[2:])
        else:
            wshape = (cin, cout // group) + tuple(w.shape[2:])
        in_shape = (batch, cin) + tuple(shape[2:])
        bias = len(node.inputs) > 2
    elif node.op in ("Gemm", "MatMul") and len(shape) == 2:
        trans_b = node.op == "Gemm" and int(attr(node, "transB", 0))
        full_in = shape[1]
        full_out = w.shape[0] if trans_b else w.shape[1]
        cin = full_in if cin is None else cin
        cout = full_out if cout is None else cout
        wshape = (cout, cin) if trans_b else (cin, cout)
        in_shape = (batch, cin)
        bias = node.op == "Gemm" and len(node.inputs) > 2
    else:
        return None
    inits = [helper.make_tensor("w", TensorProto.FLOAT, wshape, rng.normal(0, 0.1, wshape).astype(np.float32).ravel())]
    inputs = ["x", "w"]
    if bias:
        inits.append(helper.make_tensor("b", TensorProto.FLOAT, (cout,), np.zeros(cout, np.float32)))
        inputs.append("b")
    made = helper.make_node(node.op, inputs, ["y"], **attrs)
    graph = helper.make_graph([made], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version  # the input model's: a newer onnx writes IR versions onnxruntime may not read
    return model


class LatencyModel:
    """Modelled latency in nanoseconds; the allocation's cost model for ``--latency R``."""

    def __init__(self, analysis: Analysis, whole_model: onnx.ModelProto, input_name: str, sample: np.ndarray,
                 batch: int, providers: Sequence[str], round_to: int, min_keep: float, opset: int, progress=None):
        macs = MacModel(analysis)
        self.per_player, self.fixed, self.tensors = macs.per_player, macs.fixed, macs.tensors
        self.batch = batch
        prunable = self.per_player.sum(axis=1) > 0
        full = self.fixed + self.per_player.sum(axis=1)
        self.layers = []  # (factor indices, interpolator or None, seconds at full width, MACs at full width)
        self.fallback_layers: List[str] = []
        timed_rates = []
        todo = [(node, factors, base) for node, factors, base in zip(analysis.mac_nodes, macs.factors, macs.base)]
        update = progress(len(todo)) if progress else (lambda n: None)
        for node, factors, base in todo:
            grids = [_grid(int(full[f]), bool(prunable[f]), round_to, min_keep) for f in factors]
            full_macs = float(base * np.prod([full[f] for f in factors]))
            table = np.zeros([len(g) for g in grids]) if grids else None
            ok = bool(factors) and len(factors) <= 2
            for idx in np.ndindex(*table.shape) if ok else []:
                widths = {self.tensors[f]: grids[i][j] for i, (f, j) in enumerate(zip(factors, idx))}
                layer = _single_layer(node, analysis.shapes, batch, widths, opset, whole_model.ir_version)
                if layer is None:
                    ok = False
                    break
                feed = {"x": np.random.default_rng(0).normal(size=_input_dims(layer)).astype(np.float32)}
                table[idx] = _median_seconds(layer, feed, providers)
            if ok:
                # a wider layer is never modelled as faster than a narrower one: between grid
                # points of the same kernel family, differences the other way are timing noise
                for axis in range(table.ndim):
                    table = np.maximum.accumulate(table, axis=axis)
                interp = RegularGridInterpolator(tuple(np.asarray(g, float) for g in grids), table,
                                                 bounds_error=False, fill_value=None) if table.size > 1 else None
                seconds_full = float(table.flat[-1])
                self.layers.append((factors, interp, seconds_full, full_macs, base))
                if full_macs > 0:
                    timed_rates.append(seconds_full / full_macs)
            else:
                self.layers.append((factors, None, None, full_macs, base))
                self.fallback_layers.append(node.name)
            update(1)
        rate = float(np.median(timed_rates)) if timed_rates else 0.0
        self.layers = [(f, i, s if s is not None else rate * m, m, b) for f, i, s, m, b in self.layers]
        feed = {input_name: np.ascontiguousarray(np.repeat(sample[None], batch, axis=0))}
        self.whole_seconds = _median_seconds(whole_model, feed, providers)
        layer_sum = sum(s for _, _, s, _, _ in self.layers)
        self.rest_seconds = max(self.whole_seconds - layer_sum, 0.0)

    def counts(self, keep: np.ndarray) -> np.ndarray:
        return self.fixed + self.per_player @ keep.astype(np.float64)

    def macs_of_counts(self, counts: np.ndarray) -> np.ndarray:
        """Modelled nanoseconds for counts (T,) or (T, K)."""
        c = counts if counts.ndim == 2 else counts[:, None]
        total = np.full(c.shape[1], self.rest_seconds)
        for factors, interp, seconds, full_macs, base in self.layers:
            if interp is not None:
                total += np.maximum(interp(np.stack([c[f] for f in factors], axis=1)), 0.0)
            elif full_macs > 0:  # costed by MACs at the whole layer's rate
                total += seconds * base * np.prod([c[f] for f in factors], axis=0) / full_macs
            else:
                total += seconds
        total *= 1e9
        return total if counts.ndim == 2 else total[0]

    def macs(self, keep: np.ndarray) -> int:
        return int(round(float(self.macs_of_counts(self.counts(keep)))))


def _input_dims(model: onnx.ModelProto):
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
