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
those that were timed. Identical layers at identical widths (a ResNet's blocks
within a stage) are the same single-layer model and are timed once: timed
separately, three such layers of resnet20_fmnist were priced 0.28 to 0.51 ms
for the same cut, so the allocation chose among them by timing noise.

:class:`LatencyModel` has the interface of :class:`onnxprune.allocate.MacModel`
(``counts``, ``macs_of_counts``, ``macs``, ``per_player``), with costs in
nanoseconds, so the allocation runs on it unchanged.
"""

from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from scipy.interpolate import RegularGridInterpolator

from .allocate import MacModel, allowed_counts
from .analyse import Analysis
from .latency import time_session
from .ops import rule_for
from .runtime import make_session

RUNS, MAX_RUNS, MIN_SECONDS = 7, 50, 0.05  # per timing: many small sessions, so shorter than latency.measure's


def _seconds(model: onnx.ModelProto, feed: dict, providers: Sequence[str]) -> float:
    return time_session(make_session(model, providers, optimize=True), feed, RUNS, MAX_RUNS, MIN_SECONDS)


GRID_POINTS = 6  # widths timed per side of a layer, at most


def _grid(full: int, prunable: bool, round_to: int, min_keep: float, narrow_unit: int = 0) -> List[int]:
    """The widths a layer is timed at: counts the allocation may choose (so that the steps
    of the kernels, such as a count between two blocks costing what the next block does, are
    measured rather than interpolated over), at most GRID_POINTS of them, evenly spread
    from the --min-keep floor to the full width."""
    if not prunable or full <= 1:
        return [full]
    floor = max(1, math.ceil(min_keep * full - 1e-9))
    allowed = allowed_counts(full, round_to, narrow_unit)
    points = allowed[allowed >= floor]
    if len(points) == 0:
        points = allowed[-1:]
    if len(points) > GRID_POINTS:
        points = points[np.unique(np.round(np.linspace(0, len(points) - 1, GRID_POINTS)).astype(int))]
    return sorted({int(p) for p in points} | {full})


def _single_layer(node: gs.Node, shapes: dict, batch: int, widths: dict, opset: int,
                  ir_version: int) -> Optional[Tuple[onnx.ModelProto, Tuple[int, ...]]]:
    """``node`` alone with the given channel counts of its input and output (random weights)
    and its input shape, or None for a layer its rule cannot resize."""
    x, y = node.inputs[0], node.outputs[0]
    shape = shapes.get(x.name)
    if shape is None or any(d is None for d in shape[1:]) or (node.op == "MatMul" and len(shape) != 2):
        return None
    size = rule_for(node.op, node.domain or "").resized(node, widths.get(x.name), widths.get(y.name))
    if size is None:
        return None
    in_shape = (batch, size.cin) + tuple(shape[2:])
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, size.weight_shape).astype(np.float32)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, size.weight_shape, weight.ravel())]
    inputs = ["x", "w"]
    if len(node.inputs) > 2 and node.op != "MatMul":
        inits.append(helper.make_tensor("b", TensorProto.FLOAT, (size.cout,), np.zeros(size.cout, np.float32)))
        inputs.append("b")
    made = helper.make_node(node.op, inputs, ["y"], **dict(node.attrs, **size.attrs))
    graph = helper.make_graph([made], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version  # the input model's: a newer onnx writes IR versions onnxruntime may not read
    return model, in_shape


class LatencyModel(MacModel):
    """Modelled latency in nanoseconds; the allocation's cost model for ``--latency R``.
    Counts (``counts``, ``per_player``) are MacModel's; only their price differs."""

    def __init__(self, analysis: Analysis, whole_model: onnx.ModelProto, input_name: str, sample: np.ndarray,
                 batch: int, providers: Sequence[str], round_to: int, min_keep: float, opset: int, progress=None,
                 narrow_unit: int = 0):
        super().__init__(analysis)
        self.batch = batch
        prunable = self.per_player.sum(axis=1) > 0
        full = self.fixed + self.per_player.sum(axis=1)
        self.layers = []  # (factor indices, interpolator or None, seconds at full width, MACs at full width, base)
        self.fallback_layers: List[str] = []
        timed_rates = []
        timed = {}  # digest of a single-layer model (weights included) -> its seconds
        update = progress(len(analysis.mac_nodes)) if progress else (lambda n: None)
        for node, factors, base in zip(analysis.mac_nodes, self.factors, self.base):
            grids = [_grid(int(full[f]), bool(prunable[f]), round_to, min_keep, narrow_unit) for f in factors]
            full_macs = float(base * np.prod([full[f] for f in factors]))
            table = np.zeros([len(g) for g in grids])
            ok = bool(factors) and len(factors) <= 2
            for idx in np.ndindex(*table.shape) if ok else []:
                widths = {self.tensors[f]: grids[i][j] for i, (f, j) in enumerate(zip(factors, idx))}
                made = _single_layer(node, analysis.shapes, batch, widths, opset, whole_model.ir_version)
                if made is None:
                    ok = False
                    break
                layer, in_shape = made
                key = hashlib.sha256(layer.SerializeToString()).digest()
                if key not in timed:
                    timed[key] = _seconds(layer, {"x": np.random.default_rng(0).normal(size=in_shape).astype(np.float32)},
                                          providers)
                table[idx] = timed[key]
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
        self.whole_seconds = _seconds(whole_model, feed, providers)
        layer_sum = sum(s for _, _, s, _, _ in self.layers)
        self.rest_seconds = max(self.whole_seconds - layer_sum, 0.0)

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

    def describe(self, alloc) -> dict:
        """The report's summary of the modelled latency of an allocation made on this model."""
        return dict(batch=self.batch, before_ms=alloc.macs_before / 1e6, after_ms=alloc.macs_after / 1e6,
                    reduction=alloc.reduction, rest_ms=self.rest_seconds * 1e3,
                    layers_timed=len(self.layers) - len(self.fallback_layers),
                    layers_costed_by_macs=list(self.fallback_layers))
