"""Static shapes of every tensor for one concrete input size."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import onnx

from .prepare import data_inputs

Shape = Tuple[Optional[int], ...]


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


def static_shapes(model: onnx.ModelProto, inputs: Dict[str, Tuple[int, ...]]) -> Dict[str, Shape]:
    """Infer every tensor's shape with the graph inputs fixed to ``inputs``.

    Works on a copy: the model's own (possibly dynamic) input shapes stay as they are.
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
    m = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    shapes: Dict[str, Shape] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = _dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for t in m.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes
