"""The convolutions onnxruntime's CPU provider runs, which can be wider than the model's.

On x86, onnxruntime's graph optimisations rewrite convolutions for its NCHWc layout, which
stores channels in blocks of the vector width (16 floats with AVX-512), and pad a
convolution's filters, and its input channels where there is at least a block of them, up to
whole blocks. Measured with onnxruntime 1.31 on an AVX-512 CPU (bench/kernel_shapes.py): a
3x3 conv keeping 8 of its 16 filters runs 16, half of them zero, so only its consumer gets
faster, and resnet20_fmnist pruned by 50.2% of its counted MACs runs 41.5% fewer. So the
report says how many convolution MACs the runtime executes beside how many the model holds:
that, not the count, bounds the speedup, and the padded layers say where a cut bought nothing.
A conv reading fewer channels than a block, or not a whole number of blocks, reads the plain
layout: onnxruntime converts the blocked tensor back for it (ReorderOutput), a pass over the
data that the original did not make (three of them took 3% of resnet20_fmnist's pruned model's
time at batch 128, bench/results/2026-11-22-node-profile-resnet20.md); the report counts them too.

It is read from onnxruntime's own optimised graph, not assumed: whatever padding (or none)
the installed build does is what is reported. Convolutions are paired with the model's by
name: a rewritten one is named after the tensor it writes, the model's convolution output or,
where an activation or a residual Add was fused into it, a tensor a few elementwise ops
downstream. A convolution that cannot be paired (unnamed, or whose partner is not its own
weights padded) is counted as the model holds it. Read it on a prepared model: preparing
names every node and folds weights held in Constant nodes into initializers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .runtime import make_session
from .shapes import Shape, static_shapes

NCHWC_SUFFIX = "_nchwc"
LAYOUT_OPS = ("ReorderInput", "ReorderOutput")  # onnxruntime's conversions to and from its blocked layout
FUSED_DEPTH = 4  # elementwise ops after a convolution that onnxruntime may fuse into it


@dataclass
class ConvKernel:
    name: str
    held: Tuple[int, ...]  # the weight's dims in the model
    run: Tuple[int, ...]  # the weight's dims onnxruntime runs
    counted: int  # multiply-accumulates per sample, of the held dims
    executed: int  # of the run dims, at the same output size

    @property
    def padded(self) -> bool:
        return self.run != self.held


@dataclass
class KernelMacs:
    convs: List[ConvKernel] = field(default_factory=list)
    layout_changes: int = 0  # LAYOUT_OPS nodes in the optimised graph, each a pass over a tensor

    @property
    def counted(self) -> int:
        return sum(c.counted for c in self.convs)

    @property
    def executed(self) -> int:
        return sum(c.executed for c in self.convs)


def _conv_weights(model: onnx.ModelProto) -> List[Tuple[onnx.NodeProto, Optional[Tuple[int, ...]]]]:
    dims = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    return [(n, dims.get(n.input[1]) if len(n.input) > 1 else None) for n in model.graph.node if n.op_type == "Conv"]


def _plausible(held: Tuple[int, ...], run: Optional[Tuple[int, ...]]) -> bool:
    """``run`` can be ``held`` padded: the same kernel, at least as many filters and inputs."""
    return (run is not None and len(run) == len(held) and run[2:] == held[2:]
            and all(r >= h for r, h in zip(run[:2], held[:2])))


def _run_dims(model: onnx.ModelProto, optimised: onnx.ModelProto) -> Dict[str, Tuple[int, ...]]:
    """Conv name in ``model`` -> the weight dims of the convolution onnxruntime runs for it:
    the optimised convolution of the same name, else the one named after the tensor it writes
    (``<tensor>_nchwc``), that tensor being this conv's output or a few single-reader
    elementwise ops downstream of it (an activation, a residual Add fused into it)."""
    run = _conv_weights(optimised)
    by_name = {n.name: w for n, w in run if w is not None and n.name}
    by_output = {n.name[:-len(NCHWC_SUFFIX)]: w for n, w in run if w is not None and n.name.endswith(NCHWC_SUFFIX)}
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    paired = {}
    for node, held in _conv_weights(model):
        if held is None or not node.name:
            continue
        found = by_name.get(node.name)
        tensor = node.output[0]
        for _ in range(FUSED_DEPTH):
            if found is not None or tensor in by_output:
                break
            nxt = readers.get(tensor, [])
            if len(nxt) != 1 or nxt[0].op_type == "Conv" or not nxt[0].output:
                break
            tensor = nxt[0].output[0]
        found = found if found is not None else by_output.get(tensor)
        if _plausible(held, found):
            paired[node.name] = found
    return paired


def conv_kernels(model: onnx.ModelProto, input_shapes: Dict[str, Shape], providers: Sequence[str],
                 shapes: Optional[Dict[str, Shape]] = None, ours: bool = False) -> Optional[KernelMacs]:
    """Each Conv of ``model`` as held and as onnxruntime's CPU provider runs it, with their MACs
    per sample at ``input_shapes``; None on other providers, whose kernels are not read here.
    ``ours``: a model onnxprune made (onnxruntime's failures on it are internal errors)."""
    if not providers or providers[0] != "CPUExecutionProvider":
        return None
    shapes = shapes if shapes is not None else static_shapes(model, input_shapes)
    folder = tempfile.mkdtemp(prefix="onnxprune-kernels-")
    try:
        path = os.path.join(folder, "optimised.onnx")
        make_session(model, providers, optimize=True, ours=ours, optimised_to=path)
        optimised = onnx.load(path, load_external_data=False)  # the dims are in the graph
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    run = _run_dims(model, optimised)
    out = KernelMacs(layout_changes=sum(n.op_type in LAYOUT_OPS for n in optimised.graph.node))
    for node, held in _conv_weights(model):
        shape = shapes.get(node.output[0])
        if held is None or shape is None or len(shape) < 3 or any(d is None for d in shape[2:]):
            continue  # no MAC count for it here, as in flops.count_macs
        pixels = int(np.prod(shape[2:], dtype=np.int64))
        ran = run.get(node.name, held)
        out.convs.append(ConvKernel(node.name, held, ran, int(np.prod(held, dtype=np.int64)) * pixels,
                                    int(np.prod(ran, dtype=np.int64)) * pixels))
    return out
