"""FLOPs (multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul) and parameters,
counted on any model from its own initializers and inferred shapes."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import onnx

from . import weights
from .ops import MAC_OPS, CountContext, rule_for
from .prepare import PrepareLog, constant_nodes_to_initializers
from .shapes import Shape, channel_count, static_shapes


def count_macs(model: onnx.ModelProto, inputs: Dict[str, Tuple[int, ...]],
               shapes: Optional[Dict[str, Shape]] = None) -> int:
    """MACs for one sample of the given input shape(s) (batch axis set to 1). ``shapes``: the
    model's static shapes for those inputs where the caller has them already."""
    inputs = {k: (1,) + tuple(v[1:]) for k, v in inputs.items()}
    if shapes is None and any(n.op_type == "Constant" for n in model.graph.node):
        # weights held in Constant nodes (Paddle) are only readable as initializers
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        constant_nodes_to_initializers(copy.graph, PrepareLog())
        model = copy
    if shapes is None:
        shapes = static_shapes(model, inputs)
    graph = weights.import_graph(model)

    ctx = CountContext(shapes, lambda name: channel_count(shapes, name))
    return sum(rule_for(n.op, n.domain or "").macs(n, ctx) for n in graph.nodes
               if n.op in MAC_OPS and (n.domain or "") in ("", "ai.onnx"))


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all initializers and Constant-node tensors (the weights a deployment has
    to carry; Paddle-style files hold them in Constant nodes)."""
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensors.extend(a.t for a in node.attribute if a.name == "value")
    total = 0
    for t in tensors:
        n = 1
        for d in t.dims:
            n *= d
        total += n
    return total
