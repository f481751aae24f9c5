"""Static shapes of every tensor for one concrete input size."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import onnx

from .prepare import FOLD_ROUNDS, data_inputs, fold_round

Shape = Tuple[Optional[int], ...]


def channel_count(shapes: Dict[str, Shape], name: str) -> int:
    """Axis 1 of tensor ``name`` (its channels), 0 where unknown."""
    shape = shapes.get(name)
    return int(shape[1]) if shape is not None and len(shape) > 1 and shape[1] else 0


def _dims(value_info: onnx.ValueInfoProto) -> Optional[Shape]:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)


def input_shape(model: onnx.ModelProto, name: str) -> Optional[Shape]:
    for vi in model.graph.input:
        if vi.name == name:
            return _dims(vi)
    return None


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


def _collect(model: onnx.ModelProto, shapes: Dict[str, Shape], types: Optional[Dict[str, int]] = None) -> int:
    """Add every tensor's inferred shape to ``shapes`` (a better-known one replaces a
    worse one), and its element type to ``types`` where given; return how many tensors
    still lack a full shape."""
    unknown = 0
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if types is not None and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
        dims = _dims(vi)
        if dims is None or None in dims:
            unknown += 1
        if dims is None:
            continue
        old = shapes.get(vi.name)
        if old is None or sum(d is None for d in dims) < sum(d is None for d in old):
            shapes[vi.name] = dims
    return unknown


def static_shapes(model: onnx.ModelProto, inputs: Dict[str, Tuple[int, ...]],
                  types: Optional[Dict[str, int]] = None) -> Dict[str, Shape]:
    """Infer every tensor's shape with the graph inputs fixed to ``inputs`` (and, into
    ``types`` where given, its element type, from the same inference).

    Works on a copy: the model's own (possibly dynamic) input shapes stay as they are.
    Where inference leaves shapes unknown (reshape targets computed from Shape ops, as
    torch exports them), the shape arithmetic is folded on the copy, whose input sizes
    are now fixed, and inference runs again, until every shape is known or nothing
    more folds.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in data_inputs(m.graph):
        if vi.name in inputs:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in inputs[vi.name]:
                dims.add().dim_value = int(d)
    del m.graph.value_info[:]
    m = _infer(m)
    shapes: Dict[str, Shape] = {}
    unknown = _collect(m, shapes, types)
    for _ in range(FOLD_ROUNDS):
        if not unknown:
            break
        # exporters spell out a reshape target as Shape -> Gather -> Div -> Concat, which
        # onnx's data propagation cannot follow past the Div: fold it on the copy
        try:
            folded = fold_round(m)
        except Exception:  # folding only sharpens shapes; a graph it cannot take keeps what inference found
            folded = None
        if folded is None:
            break
        del folded.graph.value_info[:]
        m = _infer(folded)
        unknown = _collect(m, shapes, types)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes
