"""Run a model in consecutive segments, keeping the tensors that cross each cut.

Recovery fits layer after layer against the pruned model's own inputs, so the
pruned model must be advanced one layer at a time while its earlier layers
change. Cutting the graph before each layer to refit and storing the live
tensors at the cut (the *frontier*) for every calibration image means each
node runs once per image in total: the whole schedule costs about one pass
of each model, not one pass per layer. Frontiers live in memory while small
and in a temporary file beyond ``SPILL_BYTES``, so RAM does not grow with the
number of calibration images.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Sequence

import numpy as np
import onnx
from onnx import helper

SPILL_BYTES = 512 * 2 ** 20


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


class Frontier:
    """Per-image storage of the tensors at one cut. Batches are kept as onnxruntime
    returned them (no copy) until their total passes ``SPILL_BYTES``; then every tensor
    goes to a memory-mapped temporary file."""

    def __init__(self, folder: str, images: int):
        """``images``: how many images the whole frontier will hold (sizes the spill files)."""
        self.folder = folder
        self.images = images
        self.batches: Dict[tuple, np.ndarray] = {}
        self.maps: Dict[str, np.ndarray] = {}
        self.total = 0

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        if name in self.maps:
            self.maps[name][start:start + len(values)] = values
            return
        self.batches[(name, start)] = values
        self.total += values.nbytes
        if self.total > SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        for (name, start), values in list(self.batches.items()):
            if name not in self.maps:
                fd, path = tempfile.mkstemp(dir=self.folder, suffix=".npy")
                os.close(fd)
                self.maps[name] = np.lib.format.open_memmap(path, mode="w+", dtype=values.dtype,
                                                            shape=(self.images,) + values.shape[1:])
            self.maps[name][start:start + len(values)] = values
        self.batches = {}
        self.total = 0

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        if name in self.maps:
            return np.ascontiguousarray(self.maps[name][start:stop])
        return self.batches[(name, start)]

    def close(self) -> None:
        for a in self.maps.values():
            path = a.filename
            del a
            try:
                os.unlink(path)
            except OSError:
                pass
        self.maps, self.batches = {}, {}
