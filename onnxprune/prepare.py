"""Stage 2: normalise the graph without changing what it computes.

- weights held in Constant nodes (as Paddle exports them) become initializers;
- Identity and inference-mode Dropout are bypassed;
- nodes computed from constants alone (an Unsqueeze of a BatchNorm scale after an
  opset conversion, a shape computation on static axes) are folded into initializers,
  so that per-channel parameters and reshape targets become constants the op rules
  can slice;
- BatchNormalization right after a Conv is folded into the Conv's weights;
- every node gets a unique name, so later stages can refer to nodes by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import onnx

from . import weights


FOLD_LIMIT_BYTES = 64 * 2 ** 20  # never materialise a folded constant larger than this


@dataclass
class PrepareLog:
    folded_nodes: int = 0
    constants_to_initializers: int = 0
    bypassed: int = 0
    folded_batchnorms: List[str] = field(default_factory=list)


def data_inputs(graph: onnx.GraphProto) -> List[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (old IR lists initializers as inputs too)."""
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _consumers(graph: onnx.GraphProto) -> Dict[str, List[onnx.NodeProto]]:
    out: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def _constants_to_initializers(graph: onnx.GraphProto, log: PrepareLog) -> None:
    keep = []
    for node in graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attr and node.domain in ("", "ai.onnx"):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr["value"].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            log.constants_to_initializers += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _fold_constants(model: onnx.ModelProto, log: PrepareLog) -> onnx.ModelProto:
    """Evaluate (with onnxruntime, through onnx-graphsurgeon) the nodes whose inputs are all
    constant, and replace them by initializers. Graph inputs and outputs are untouched."""
    before = len(model.graph.node)
    graph = weights.import_graph(model)
    _load_foldable(graph)
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=FOLD_LIMIT_BYTES)
    except Exception:  # a graph the folder cannot handle stays as it was: folding is an optimisation
        return model
    graph.cleanup(remove_unused_graph_inputs=False)
    folded = weights.export_graph(graph)
    if len(folded.graph.node) == before:
        return model
    copy_model_fields(model, folded)
    log.folded_nodes = before - len(folded.graph.node)
    return folded


def _load_foldable(graph) -> None:
    """Give the constants that folding may evaluate their arrays (shared, not copied):
    onnx-graphsurgeon runs them through onnxruntime from bytes, where a stub cannot be read."""
    import onnx_graphsurgeon as gs

    constant = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for node in graph.nodes:  # in topological order, as ONNX stores them
        if node.inputs and all(t.name in constant or not t.name for t in node.inputs):
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    t.values  # noqa: B018 (loads)
            constant.update(o.name for o in node.outputs)


def copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Model-level fields that a graph rebuilt by onnx-graphsurgeon does not carry."""
    dst.ir_version = src.ir_version
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, name, getattr(src, name))
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    dst.graph.name = src.graph.name


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _bypass_identities(graph: onnx.GraphProto, log: PrepareLog) -> None:
    outputs = {o.name for o in graph.output}
    consumers = _consumers(graph)
    keep = []
    for node in graph.node:
        passthrough = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1]
                                           or node.output[1] not in consumers and node.output[1] not in outputs)
            # Dropout in training mode (a constant True training_mode input) is not an identity
            and (len(node.input) < 3 or not node.input[2])
        )
        if passthrough and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            _rename_input(graph, node.output[0], node.input[0])
            log.bypassed += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _fold_batchnorms(graph: onnx.GraphProto, log: PrepareLog, release: bool = False) -> None:
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    consumers = _consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    removed = set()
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or bn.input[0] in outputs:
            continue
        if len(consumers.get(conv.output[0], [])) != 1:
            continue
        params = [inits.get(name) for name in bn.input[1:5]]
        weight = inits.get(conv.input[1])
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if weight is None or any(p is None for p in params) or (bias_name and bias_name not in inits):
            continue
        # a weight shared with another node must not change under it
        if len(consumers.get(conv.input[1], [])) != 1 or (
            bias_name and len(consumers.get(bias_name, [])) != 1
        ):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (weights.array(p).astype(np.float64) for p in params)
        w = weights.array(weight)
        if w.shape[0] != gamma.shape[0]:
            continue
        factor = gamma / np.sqrt(var + eps)
        b = weights.array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros_like(mean)
        new_w = (w.astype(np.float64) * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        new_b = ((b - mean) * factor + beta).astype(w.dtype)
        del w
        old = weights.keys_of([weight])
        weight.CopyFrom(weights.make_tensor(new_w, weight.name))
        if release:  # the input model's copy of this weight is not needed any more
            for key in old:
                weights.active().discard(key)
        if bias_name:
            inits[bias_name].CopyFrom(weights.make_tensor(new_b, bias_name))
        else:
            bias_name = conv.output[0] + "_folded_bias"
            graph.initializer.append(weights.make_tensor(new_b, bias_name))
            if len(conv.input) == 2:
                conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        log.folded_batchnorms.append(bn.name or bn.output[0])
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer if t.name not in used}
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # old IR versions list initializers as graph inputs as well
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def _name_nodes(graph: onnx.GraphProto) -> None:
    taken = {n.name for n in graph.node if n.name}
    seen = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in taken or name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)


def prepare(model: onnx.ModelProto, release: bool = False) -> tuple[onnx.ModelProto, PrepareLog]:
    """Return a normalised copy of ``model``; the input's protobuf is not modified.

    Large weights stay shared with ``model`` (in the weight store) unless changed. With
    ``release``, the store lets go of each weight of ``model`` that a BatchNorm fold replaces,
    as soon as it is replaced: ``model``'s weights may not be read afterwards, and a large
    model never holds its convolutions twice.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    log = PrepareLog()
    graph = out.graph
    _constants_to_initializers(graph, log)
    out = _fold_constants(out, log)
    graph = out.graph
    _bypass_identities(graph, log)
    _fold_batchnorms(graph, log, release=release and weights.active() is not None)
    _name_nodes(graph)
    # stale intermediate shapes would contradict the pruned graph; re-inferred later
    del graph.value_info[:]
    return out, log
