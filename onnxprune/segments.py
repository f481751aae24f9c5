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
            for name in n.input:
                if name:
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
        used = {name for n in nodes for name in n.input if name}
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


class _SpillFile:
    """One tensor of a frontier on disk: image ``i`` at offset ``i * per_image`` bytes. Plain
    reads and writes, not a memory map: mapped pages would count in the process's resident
    memory as they are touched, which is the growth spilling is there to stop. The file is
    opened for each read or write, not held open: the refit stores rows for every layer at
    once, and a deep network's files would otherwise run into the limit on open files."""

    def __init__(self, folder: str, like: np.ndarray):
        fd, self.path = tempfile.mkstemp(dir=folder, suffix=".bin")
        os.close(fd)
        self.dtype, self.shape = like.dtype, like.shape[1:]
        self.per_image = like[:1].nbytes

    def write(self, start: int, values: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(start * self.per_image)
            np.ascontiguousarray(values, dtype=self.dtype).tofile(f)

    def read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * (self.per_image // self.dtype.itemsize)
        with open(self.path, "rb") as f:
            f.seek(start * self.per_image)
            return np.fromfile(f, dtype=self.dtype, count=count).reshape((stop - start,) + self.shape)

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
        self.files: Dict[str, _SpillFile] = {}
        self.held = 0  # bytes of this frontier's batches counted against the budget

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        if name not in self.files and self.budget.used + values.nbytes <= self.budget.limit:
            self.batches[(name, start)] = values
            self.held += values.nbytes
            self.budget.used += values.nbytes
            return
        self._spill()
        if name not in self.files:
            self.files[name] = _SpillFile(self.folder, values)
        self.files[name].write(start, values)

    def _spill(self) -> None:
        for (name, start), values in self.batches.items():
            if name not in self.files:
                self.files[name] = _SpillFile(self.folder, values)
            self.files[name].write(start, values)
        self.batches = {}
        self.budget.used -= self.held
        self.held = 0

    def has(self, name: str) -> bool:
        return name in self.files or any(key[0] == name for key in self.batches)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        if name in self.files:
            return self.files[name].read(start, stop)
        return self.batches[(name, start)]

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.budget.used -= self.held
        self.files, self.batches, self.held = {}, {}, 0
