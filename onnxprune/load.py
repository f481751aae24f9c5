"""Stage 1: read a model from a path or take a ModelProto, and check it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import onnx
from onnx import external_data_helper

from .errors import InputError

MIN_OPSET = 11


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Optional[str]  # where it came from, None for an in-memory model
    file_size: Optional[int]  # bytes on disk, external data included


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _check_external_locations(model: onnx.ModelProto, folder: str) -> int:
    """Refuse external data that would make us read outside the model's folder.

    Runs before any external file is opened. Returns the bytes of external data.
    """
    real_folder = os.path.realpath(folder)
    total = 0
    seen = set()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
            raise InputError(
                f"external data location {location!r} of tensor {tensor.name!r} is outside the model's folder"
            )
        target = os.path.realpath(os.path.join(real_folder, location))
        if os.path.commonpath([target, real_folder]) != real_folder:
            raise InputError(
                f"external data location {location!r} of tensor {tensor.name!r} leaves the model's folder"
            )
        if not os.path.isfile(target):
            raise InputError(f"external data file {location!r} of tensor {tensor.name!r} is missing")
        if target not in seen:
            seen.add(target)
            total += os.path.getsize(target)
    return total


def load_model(source: Union[str, os.PathLike, onnx.ModelProto]) -> LoadedModel:
    """Read and check a model. Raises InputError with a one-line reason."""
    if isinstance(source, onnx.ModelProto):
        model, path, size = source, None, source.ByteSize()
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise InputError(f"model file {path!r} does not exist")
        if not os.path.isfile(path):
            raise InputError(f"model path {path!r} is not a file")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"cannot read model {path!r}: {e.strerror}") from e
        try:
            model = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf raises several types for garbage
            raise InputError(f"{path!r} is not an ONNX model (it does not parse: {type(e).__name__})") from e
        if not model.HasField("graph") or len(model.graph.node) == 0:
            raise InputError(f"{path!r} is not an ONNX model with a graph (no nodes)")
        size = len(data) + _check_external_locations(model, os.path.dirname(os.path.abspath(path)))
        try:
            external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as e:
            raise InputError(f"cannot read the external data of {path!r}: {e}") from e
    if len(model.graph.node) == 0:
        raise InputError("the model's graph is empty")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise InputError(
            f"opset {opset} is older than the oldest supported ({MIN_OPSET}); "
            "convert it first with onnx.version_converter"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"the model fails the ONNX checker: {first}") from e
    if not any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node):
        raise InputError("the model has no Conv layer: nothing to prune")
    return LoadedModel(model=model, path=path, file_size=size)
