"""Run a model in consecutive segments, keeping the tensors that cross each cut.

Recovery fits layer after layer against the pruned model's own inputs, so the
pruned model must be advanced one layer at a time while its earlier layers
change. Cutting the graph before each layer to refit and storing the live
tensors at the cut (the *frontier*) for every calibration image means each
node runs once per image in total: about one pass of the model, not one pass
per layer. Frontiers (and the rows the refit stores from the original model,
kept the same way) live in memory while all of them together take at most
``SPILL_BYTES`` and in temporary files beyond, so RAM does not grow with the
number of calibration images.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from .load import node_reads

SPILL_BYTES = 512 * 2 ** 20  # all frontiers in memory together


def _value_infos(model: onnx.ModelProto) -> Dict[str, onnx.ValueInfoProto]:
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        out[vi.name] = vi
    return out


class Segmenter:
    """Cuts one model before each of the given nodes (by name, in topological order)."""

    def __init__(self, model: onnx.ModelProto, cut_before: Sequence[str]):
        self.model = model
        self.nodes = list(model.graph.node)  # already topologically sorted (onnx requires it)
        position = {n.name: i for i, n in enumerate(self.nodes)}
        self.cuts = [position[name] for name in cut_before] + [len(self.nodes)]
        inits = {t.name for t in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in inits]
        last_use: Dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for name in node_reads(n):  # what an If branch reads stays live up to the If
                last_use[name] = i
        for o in model.graph.output:
            last_use[o.name] = len(self.nodes)
        self.last_use = last_use
        self.inits = inits

    def live_at(self, cut: int) -> List[str]:
        """Tensors made before node ``cut`` (or fed) that are still needed from it on."""
        made = list(self.inputs)
        for n in self.nodes[:cut]:
            made.extend(o for o in n.output if o)
        return [t for t in dict.fromkeys(made) if self.last_use.get(t, -1) >= cut]

    def segment(self, model: onnx.ModelProto, start: int, stop: int, inputs: List[str], outputs: List[str]) -> onnx.ModelProto:
        """Nodes [start, stop) of ``model`` (same topology as the cut model) as a model of their own."""
        nodes = list(model.graph.node)[start:stop]
        used = {name for n in nodes for name in node_reads(n)}
        vis = _value_infos(model)
        inits = [t for t in model.graph.initializer if t.name in used]

        def vi(name):
            if name in vis:
                return vis[name]
            return helper.make_empty_tensor_value_info(name)

        graph = helper.make_graph(nodes, "segment", [vi(n) for n in inputs], [vi(n) for n in outputs], inits)
        seg = helper.make_model(graph, opset_imports=model.opset_import)
        seg.ir_version = model.ir_version
        return seg


class MemoryBudget:
    """Bytes of frontier tensors that may stay in memory, shared by all the frontiers alive at
    once (the refit keeps the cut it reads and the one it writes, and what it stored from the
    original model for the layers still to fit)."""

    def __init__(self, limit: Optional[int] = None):
        self.limit = SPILL_BYTES if limit is None else limit
        self.used = 0


def rows_per_image(model: onnx.ModelProto, input_name: str, sample_shape: Sequence[int], fixed_batch: Optional[int],
                   at_one: Optional[Dict[str, tuple]] = None) -> Dict[str, int]:
    """For each tensor of ``model`` whose shape is known: the rows of its axis 0 that each image
    has (1 for an (N, C, ...) map, H x W for an (N x H x W, C) matrix that folds the pixels into
    the batch axis), or 0 where axis 0 does not grow with the batch (a shape, a scalar): such a
    tensor crosses a cut whole, once per batch. Read from static shapes at two batch sizes
    (``at_one``: those at batch 1, where already known), or at a fixed batch, its only one."""
    from .shapes import static_shapes

    out: Dict[str, int] = {}
    if fixed_batch:
        for name, shape in static_shapes(model, {input_name: (fixed_batch,) + tuple(sample_shape)}).items():
            if shape is not None and (not shape or shape[0] is not None):
                out[name] = shape[0] // fixed_batch if shape and shape[0] % fixed_batch == 0 else 0
        return out
    one = at_one if at_one is not None else static_shapes(model, {input_name: (1,) + tuple(sample_shape)})
    two = static_shapes(model, {input_name: (2,) + tuple(sample_shape)})
    for name, s1 in one.items():
        s2 = two.get(name)
        if s1 is None or s2 is None or len(s1) != len(s2):
            continue
        if not s1:
            out[name] = 0
        elif s1[0] is not None and s2[0] is not None:
            if s1[0] > 0 and s2[0] == 2 * s1[0]:
                out[name] = s1[0]
            elif s2[0] == s1[0]:
                out[name] = 0
    return out


def rows_seen(value: np.ndarray, images: int) -> int:
    """Rows per image of a tensor as one batch of ``images`` images shows them (0: not per image)."""
    n = len(value) if value.ndim else 0
    return n // images if n and n % images == 0 else 0


def image_rows(known: Dict[str, int], name: str, value: np.ndarray, images: int) -> int:
    """``rows_per_image``'s answer for ``name``; for a tensor it could not tell, read off the
    first batch it is seen in and kept, so every batch is cut alike."""
    if name not in known:
        known[name] = rows_seen(value, images)
    return known[name]


def real_rows(value: np.ndarray, rows: int, real: int) -> np.ndarray:
    """The rows of a tensor that belong to the first ``real`` images of its batch (all of one
    that is not per image). Those of a padded batch are copied: a view would keep the whole
    padded array alive, uncounted by the frontiers' memory budget."""
    if not rows or len(value) == real * rows:
        return value
    return value[:real * rows].copy()


class _SpillFile:
    """One tensor of a frontier on disk: image ``i`` at offset ``i * per_image`` bytes. Plain
    reads and writes, not a memory map: mapped pages would count in the process's resident
    memory as they are touched, which is the growth spilling is there to stop. The file is
    opened for each read or write, not held open: the refit stores rows for every layer at
    once, and a deep network's files would otherwise run into the limit on open files."""

    def __init__(self, folder: str, like: np.ndarray, rows: int = 1):
        fd, self.path = tempfile.mkstemp(dir=folder, suffix=".bin")
        os.close(fd)
        self.dtype, self.shape, self.rows = like.dtype, like.shape[1:], rows
        self.per_image = like[:1].nbytes * rows

    def write(self, start: int, values: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(start * self.per_image)
            np.ascontiguousarray(values, dtype=self.dtype).tofile(f)

    def read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * (self.per_image // self.dtype.itemsize)
        with open(self.path, "rb") as f:
            f.seek(start * self.per_image)
            return np.fromfile(f, dtype=self.dtype, count=count).reshape(((stop - start) * self.rows,) + self.shape)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Frontier:
    """Per-image storage of the tensors at one cut. Batches are kept as written (no copy: for
    a cut, the arrays onnxruntime returned) while the frontiers together stay within their ``budget``; past it, this
    frontier's tensors go to temporary files, so memory stays bounded however many
    calibration images there are."""

    def __init__(self, folder: str, budget: MemoryBudget):
        self.folder = folder
        self.budget = budget
        self.batches: Dict[tuple, np.ndarray] = {}
        self.whole: Dict[tuple, np.ndarray] = {}  # tensors not per image (shapes, scalars), per batch
        self.rows: Dict[str, int] = {}
        self.files: Dict[str, _SpillFile] = {}
        self.held = 0  # bytes of this frontier's batches counted against the budget

    def write(self, name: str, start: int, values: np.ndarray, rows: int = 1) -> None:
        """``values``: the rows of the batch's images from image ``start`` on, ``rows`` rows each
        (:func:`rows_per_image`); with ``rows`` 0, a tensor that is not per image, kept as it is
        for the batch that starts there (small: a shape, a scalar; never spilled)."""
        if not rows:
            self.whole[(name, start)] = values
            return
        self.rows[name] = rows
        if name not in self.files and self.budget.used + values.nbytes <= self.budget.limit:
            self.batches[(name, start)] = values
            self.held += values.nbytes
            self.budget.used += values.nbytes
            return
        self._spill()
        if name not in self.files:
            self.files[name] = _SpillFile(self.folder, values, rows)
        self.files[name].write(start, values)

    def _spill(self) -> None:
        for (name, start), values in self.batches.items():
            if name not in self.files:
                self.files[name] = _SpillFile(self.folder, values, self.rows[name])
            self.files[name].write(start, values)
        self.batches = {}
        self.budget.used -= self.held
        self.held = 0

    def has(self, name: str) -> bool:
        return name in self.files or any(key[0] == name for key in list(self.batches) + list(self.whole))

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        if (name, start) in self.whole:
            return self.whole[(name, start)]
        if name in self.files:
            return self.files[name].read(start, stop)
        return self.batches[(name, start)]

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.budget.used -= self.held
        self.files, self.batches, self.whole, self.held = {}, {}, {}, 0
