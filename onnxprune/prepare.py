"""Stage 2: normalise the graph without changing what it computes.

- weights held in Constant nodes (as Paddle exports them) become initializers;
- Identity and inference-mode Dropout are bypassed;
- nodes computed from constants alone (an Unsqueeze of a BatchNorm scale after an
  opset conversion, a shape computation on static axes) are folded into initializers,
  so that per-channel parameters and reshape targets become constants the op rules
  can slice; a reshape target entry that copies the batch axis (torch's
  ``x.view(x.size(0), -1)``) becomes 0, "copy", so that the target folds too;
- BatchNormalization right after a Conv is folded into the Conv's weights;
- every node gets a unique name, so later stages can refer to nodes by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import weights
from .load import default_opset, node_reads, readers, subgraph_reads


FOLD_LIMIT_BYTES = 64 * 2 ** 20  # never materialise a folded constant larger than this


@dataclass
class PrepareLog:
    folded_nodes: int = 0
    constants_to_initializers: int = 0
    bypassed: int = 0
    copied_dims: int = 0  # reshape target entries turned into 0 ("copy this dimension")
    folded_batchnorms: List[str] = field(default_factory=list)
    # |gamma| of each folded BatchNormalization, by the output tensor of the Conv it went into
    # (the bn-scale criterion ranks channels by it)
    bn_scale: Dict[str, np.ndarray] = field(default_factory=dict)


def data_inputs(graph: onnx.GraphProto) -> List[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (old IR lists initializers as inputs too)."""
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def constant_nodes_to_initializers(graph: onnx.GraphProto, log: PrepareLog) -> None:
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


def _inferred(model: onnx.ModelProto, keep_value_info: bool) -> onnx.ModelProto:
    """``model`` with shapes inferred (data propagation on). Shapes stored by an earlier
    pass of ours are left out: stale unknowns there would hide what inference now finds."""
    saved = [] if keep_value_info else list(model.graph.value_info)
    del model.graph.value_info[: len(saved)]
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return model
    finally:
        if saved:
            del model.graph.value_info[:]
            model.graph.value_info.extend(saved)


FOLD_ROUNDS = 8  # rounds of folding; each round can resolve one more link of a chain of shapes


def fold_round(model: onnx.ModelProto) -> Optional[onnx.ModelProto]:
    """``model`` with every node whose inputs are constants or static dimensions evaluated
    (onnx-graphsurgeon, through onnxruntime), or None when nothing folds. The folder sees
    which axes are static only through the shapes stored in ``model``."""
    graph = weights.import_graph(model)
    _load_foldable(graph)
    count = len(graph.nodes)
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=FOLD_LIMIT_BYTES)
    except Exception:  # a graph the folder cannot handle stays as it was: folding is an optimisation
        return None
    graph.cleanup(remove_unused_graph_inputs=False)
    if len(graph.nodes) == count:
        return None
    folded = weights.export_graph(graph)
    copy_model_fields(model, folded)
    return folded


def _fold_constants(model: onnx.ModelProto, log: PrepareLog, ours: bool = False) -> onnx.ModelProto:
    """Fold constants and static shape arithmetic into initializers, round after round. Graph
    inputs and outputs are untouched. ``ours``: the model's stored shapes come from an earlier
    pass of prepare.

    onnx-graphsurgeon folds Shape -> Gather of a static axis only where it knows the tensor's
    shape, so shapes are inferred first (exporters such as torch's write no intermediate
    shapes), and again after each round: folding a Slice's computed bounds makes its output
    shape, and so the next Shape, static."""
    before = len(model.graph.node)
    current = model
    for _ in range(FOLD_ROUNDS):
        folded = fold_round(_inferred(current, keep_value_info=current is model and not ours))
        if folded is None:
            break
        current = folded
    if current is model:
        return model
    log.folded_nodes += before - len(current.graph.node)
    return current


def _scalar_int(inits: Dict[str, onnx.TensorProto], name: str):
    t = inits.get(name)
    if t is None:
        return None
    v = weights.array(t)
    return int(v.reshape(-1)[0]) if v.size == 1 and v.dtype.kind in "iu" else None


def _dims_by_name(model: onnx.ModelProto) -> Dict[str, list]:
    inferred = _inferred(model, keep_value_info=False)
    out = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


def _copied_dims_to_zero(model: onnx.ModelProto, log: PrepareLog) -> bool:
    """In a Reshape target assembled by a Concat of dimensions read with Shape -> Gather
    (torch writes ``x.view(x.size(0), -1)`` and ``x.view(b, g, c // g, h, w)`` so), an
    entry that copies the dimension the data input has at the same position becomes 0,
    Reshape's "copy this dimension" (allowzero 0). It is the same dimension where the
    data input is the tensor read, at the same axis, or where one run of shape inference
    gives both the same symbol (the batch axis through a channel shuffle): inference
    hands a symbol on only between dimensions that are equal whenever the model runs,
    and makes a fresh one (unk__N) for every unknown it cannot relate. The target can
    then fold into a constant that the Reshape rule reads. Returns True if any entry
    changed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = readers(graph)
    dims = None
    zero = None
    changed = False
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(consumers.get(node.input[1], [])) != 1:
            continue
        position = 0
        for i, piece in enumerate(list(concat.input)):
            if piece in inits:
                position += int(np.prod(inits[piece].dims)) if len(inits[piece].dims) else 1
                continue
            source = _copied_dim(piece, producer, inits)
            if source is None:
                break  # a piece of unknown length: later positions are unknown
            tensor, axis = source
            if dims is None:
                dims = _dims_by_name(model)
            data, read = dims.get(node.input[0]), dims.get(tensor)
            same = (tensor == node.input[0] and axis == position) or (
                data is not None and read is not None and position < len(data) and 0 <= axis < len(read)
                and isinstance(data[position], str) and data[position] == read[axis])
            if same:
                if zero is None:
                    zero, k = "onnxprune_copy_dim", 0
                    while zero in inits and not _is_copy_zero(inits[zero]):
                        k += 1
                        zero = f"onnxprune_copy_dim_{k}"
                    if zero not in inits:
                        graph.initializer.append(weights.make_tensor(np.zeros(1, np.int64), zero))
                        inits[zero] = graph.initializer[-1]
                concat.input[i] = zero
                changed = True
                log.copied_dims += 1
            position += 1
    return changed


def _is_copy_zero(t: onnx.TensorProto) -> bool:
    v = weights.array(t)
    return v.dtype == np.int64 and v.shape == (1,) and int(v[0]) == 0


def _copied_dim(name: str, producer, inits):
    """(tensor, axis) when ``name`` is one dimension of a tensor read as Unsqueeze(Gather(Shape(T), i))
    or Gather(Shape(T), [i]); else None."""
    node = producer.get(name)
    if node is not None and node.op_type == "Unsqueeze":
        axes = [a.ints for a in node.attribute if a.name == "axes"]
        axes = list(axes[0]) if axes else (
            [_scalar_int(inits, node.input[1])] if len(node.input) > 1 and node.input[1] in inits else None)
        gather = producer.get(node.input[0])
        if axes != [0] or gather is None or gather.op_type != "Gather" or gather.input[1] not in inits:
            return None
        if len(inits[gather.input[1]].dims) != 0:
            return None  # the Gather must give a scalar for the Unsqueeze to give one element
    elif node is not None and node.op_type == "Gather":
        gather = node
        if gather.input[1] not in inits or list(inits[gather.input[1]].dims) != [1]:
            return None
    else:
        return None
    shape = producer.get(gather.input[0])
    if (shape is None or shape.op_type != "Shape" or any(a.name == "axis" and a.i for a in gather.attribute)
            or any(a.name in ("start", "end") for a in shape.attribute)):
        return None
    axis = _scalar_int(inits, gather.input[1])
    return None if axis is None or axis < 0 else (shape.input[0], axis)


def _load_foldable(graph) -> None:
    """Give the constants that folding may evaluate their arrays (shared, not copied):
    onnx-graphsurgeon runs them through onnxruntime from bytes, where a stub cannot be read."""
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
    consumers = readers(graph)
    read_inside = {name for n in graph.node for name in subgraph_reads(n)}
    keep = []
    for node in graph.node:
        passthrough = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1]
                                           or node.output[1] not in consumers and node.output[1] not in outputs)
            # Dropout in training mode (a constant True training_mode input) is not an identity
            and (len(node.input) < 3 or not node.input[2])
        )
        # an output read inside a subgraph keeps its Identity: the branch names it, not its input
        if (passthrough and node.domain in ("", "ai.onnx") and node.output[0] not in outputs
                and node.output[0] not in read_inside):
            _rename_input(graph, node.output[0], node.input[0])
            log.bypassed += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _fold_batchnorms(graph: onnx.GraphProto, log: PrepareLog, release: bool = False) -> None:
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    consumers = readers(graph)
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
        log.bn_scale[bn.output[0]] = np.abs(gamma)
        removed.add(id(bn))
        log.folded_batchnorms.append(bn.name or bn.output[0])
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(graph)


def _normalise_gemms(graph: onnx.GraphProto, opset: int) -> None:
    """Fold a Gemm's ``alpha`` into its constant B and its ``beta`` into its constant C (C goes
    where beta is 0), so that every Gemm computes A B + C: the refit writes a layer's intercept
    into C as it would into a Conv's bias, and with alpha or beta left in place it came out scaled
    by them (or, at beta 0, was lost). Constants another node also reads, or that are graph
    inputs (a caller could feed others), are left as they are, and so are those scales."""
    inits = {t.name: t for t in graph.initializer}
    fed = {i.name for i in graph.input}
    consumers = readers(graph)

    def own_constant(name: str) -> bool:
        return name in inits and name not in fed and len(consumers.get(name, [])) == 1

    for node in graph.node:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        scale = {a.name: a.f for a in node.attribute if a.name in ("alpha", "beta")}
        folded = set()
        alpha = scale.get("alpha", 1.0)
        if alpha != 1.0 and own_constant(node.input[1]):
            _scale_in_place(inits[node.input[1]], alpha)
            folded.add("alpha")
        beta = scale.get("beta", 1.0)
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if beta != 1.0 and c is not None and own_constant(c):
            _scale_in_place(inits[c], beta)
            folded.add("beta")
        elif beta == 0.0 and c is not None and opset >= 11:  # C is optional from opset 11: drop it
            del node.input[2:]
            folded.add("beta")
        if folded:
            kept = [a for a in node.attribute if a.name not in folded]
            del node.attribute[:]
            node.attribute.extend(kept)
    _drop_unused_initializers(graph)


def _scale_in_place(tensor: onnx.TensorProto, factor: float) -> None:
    values = weights.array(tensor)
    tensor.CopyFrom(weights.make_tensor((values.astype(np.float64) * factor).astype(values.dtype), tensor.name))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for n in graph.node for name in node_reads(n)} | {o.name for o in graph.output}
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


def keep_declared_outputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Give the graph outputs back the types ``template`` declares. Shape inference and constant
    folding also rewrite the outputs, filling in a dim the model leaves symbolic or unknown (an
    'N' batch behind a fixed input batch, a tf2onnx 'unk__' dim, torch's 'Convout0_dim_2'): the
    written model would then declare another signature than the original. Graph outputs are
    never pruned, so the declared types stay true."""
    declared = {vi.name: vi for vi in template.graph.output}
    for vi in model.graph.output:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])


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
    constant_nodes_to_initializers(graph, log)
    out = _fold_constants(out, log)
    for _ in range(FOLD_ROUNDS):  # a target folded to a constant lets inference give the next one's shapes
        if not _copied_dims_to_zero(out, log):
            break
        out = _fold_constants(out, log, ours=True)
    graph = out.graph
    _bypass_identities(graph, log)
    _fold_batchnorms(graph, log, release=release and weights.active() is not None)
    _normalise_gemms(graph, default_opset(out))
    _name_nodes(graph)
    # stale intermediate shapes would contradict the pruned graph; re-inferred later
    del graph.value_info[:]
    keep_declared_outputs(out, model)
    return out, log
