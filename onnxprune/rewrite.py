"""Stage 8: graph surgery. Slice initializers, fix attributes, re-infer shapes."""

from __future__ import annotations

from typing import Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import weights
from .analyse import Analysis
from .load import default_opset
from .ops import RewriteContext, rule_for
from .prepare import copy_model_fields, keep_declared_outputs


def rewrite(analysis: Analysis, keep_player: Optional[np.ndarray], template: onnx.ModelProto) -> Tuple[onnx.ModelProto, Set[str]]:
    """Remove the players not in ``keep_player``; return the new model and the names of
    the nodes whose parameters or attributes changed.

    Mutates ``analysis.graph``. ``template`` supplies the model-level fields
    (IR version, opsets, metadata) that the graph does not carry.
    """
    graph = analysis.graph
    keep = analysis.keep_fn(keep_player)
    fresh_names = set(graph.tensors().keys())
    changed: Set[str] = set()

    def fresh(base: str) -> str:
        k, name = 0, base
        while name in fresh_names:
            k += 1
            name = f"{base}_{k}"
        fresh_names.add(name)
        return name

    def set_constant(node: gs.Node, index: int, values: np.ndarray) -> None:
        changed.add(node.name)
        values = np.ascontiguousarray(values)
        if index < len(node.inputs) and node.inputs[index].name:
            tensor = node.inputs[index]
            if isinstance(tensor, gs.Constant) and len(tensor.outputs) <= 1:
                tensor.values = values
                return
            # shared with another node that may need other channels: give this node its own copy
            name = fresh(f"{tensor.name}_{node.name}")
        else:  # an optional input the node did not have (Split's sizes)
            name = fresh(f"{node.name}_input{index}")
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = gs.Constant(name, values)

    def set_attr(node: gs.Node, name: str, value) -> None:
        changed.add(node.name)
        if value is None:
            node.attrs.pop(name, None)
        else:
            node.attrs[name] = value

    ctx = RewriteContext(analysis.shapes, keep, set_constant, default_opset(template), set_attr)
    if keep_player is not None and not keep_player.all():
        for node in list(graph.nodes):
            rule_for(node.op, node.domain or "").rewrite(node, ctx)
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in io:
            tensor.shape = None  # stale after pruning; re-inferred below
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = weights.export_graph(graph)  # large weights stay in the store
    copy_model_fields(template, model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    keep_declared_outputs(model, template)
    return model, changed
