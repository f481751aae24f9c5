"""Stage 1: read a model from a path or take a ModelProto, and check it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
from onnx import external_data_helper

from . import weights
from .errors import InputError

MIN_OPSET = 11


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Optional[str]  # where it came from, None for an in-memory model
    file_size: Optional[int]  # bytes on disk, external data included
    files: Tuple[str, ...] = ()  # the model file and its external data files (real paths)

    @property
    def external_data(self) -> bool:
        """The file keeps its weights in external data files."""
        return len(self.files) > 1


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def subgraph_reads(node: onnx.NodeProto) -> Set[str]:
    """Names a node's subgraphs (If branches, Loop and Scan bodies, at any depth) read from the
    scopes around them: inputs of the node that its ``input`` list does not name. Every pass that
    asks who reads a tensor must count these, or a tensor read only inside a branch looks unused."""
    def graphs(n: onnx.NodeProto):
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
            elif a.type == onnx.AttributeProto.GRAPHS:
                yield from a.graphs

    reads: Set[str] = set()
    made: Set[str] = set()
    stack = list(graphs(node))
    while stack:
        g = stack.pop()
        made.update(i.name for i in g.input)
        made.update(t.name for t in g.initializer)
        for n in g.node:
            reads.update(x for x in n.input if x)
            made.update(o for o in n.output if o)
            stack.extend(graphs(n))
    return reads - made


def node_reads(node: onnx.NodeProto) -> List[str]:
    """Every name ``node`` reads: its inputs, then what its subgraphs read from outside them."""
    names = [x for x in node.input if x]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        names.extend(sorted(subgraph_reads(node) - set(names)))
    return names


def readers(graph: onnx.GraphProto) -> Dict[str, List[onnx.NodeProto]]:
    """Who reads each name, once per time a node names it (:func:`node_reads`: a node that
    reads it inside a subgraph counts)."""
    out: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_reads(node):
            out.setdefault(name, []).append(node)
    return out


def names_in(model: onnx.ModelProto) -> set:
    """Every name in the graph: tensors, initializers, inputs and nodes."""
    names = {t for n in model.graph.node for t in list(n.input) + list(n.output)} | {n.name for n in model.graph.node}
    return names | {t.name for t in model.graph.initializer} | {t.name for t in model.graph.input}


def free_name(name: str, taken: set) -> str:
    """``name``, or ``name_<i>`` where it is in ``taken``; taken from then on."""
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _external_info(tensor: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in tensor.external_data}


def check_external_locations(model: onnx.ModelProto, folder: str) -> Tuple[int, Tuple[str, ...]]:
    """Refuse external data that would make us read outside the model's folder.

    Runs before any external file is opened. Returns the bytes of external data and the files.
    """
    real_folder = os.path.realpath(folder)
    total = 0
    seen = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = _external_info(tensor).get("location", "")
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
            seen.append(target)
            total += os.path.getsize(target)
    return total, tuple(seen)


def _read_into(f, out: np.ndarray) -> int:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _load_external(model: onnx.ModelProto, folder: str, store: Optional[weights.WeightStore]) -> None:
    """Read the external data of ``model`` (ours to change): initializers of a plain numeric
    type go straight from the file into the store's arrays (one copy of each weight, never a
    protobuf); anything else is read into the tensor as ONNX does."""
    # the main graph's initializers come first in onnx's walk over all tensors; only they go to the
    # store (ids of protobuf wrappers are no way to tell: wrappers are made and freed on access)
    top_level = len(model.graph.initializer)
    handles = {}
    try:
        for position, tensor in enumerate(external_data_helper._get_all_tensors(model)):
            if not external_data_helper.uses_external_data(tensor):
                continue
            info = _external_info(tensor)
            path = os.path.join(folder, info["location"])
            offset = int(info.get("offset") or 0)
            size = os.path.getsize(path)
            need = weights.nbytes_of(tensor)
            if store is None or position >= top_level or need < weights.STUB_BYTES:
                length = int(info["length"]) if info.get("length") else size - offset
                if offset < 0 or length < 0 or offset + length > size:
                    raise InputError(f"external data of tensor {tensor.name!r} lies beyond the end of {info['location']!r}")
                external_data_helper.load_external_data_for_tensor(tensor, folder)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
                continue
            length = int(info["length"]) if info.get("length") else need
            if length != need:
                raise InputError(f"external data of tensor {tensor.name!r} has {length} bytes; its shape needs {need}")
            if offset < 0 or offset + need > size:
                raise InputError(f"external data of tensor {tensor.name!r} lies beyond the end of {info['location']!r}")
            if path not in handles:
                handles[path] = open(path, "rb", buffering=0)
            f = handles[path]
            values = np.empty(tuple(tensor.dims), dtype=weights.numpy_dtype(tensor))
            f.seek(offset)
            if _read_into(f, values) != need:
                raise InputError(f"external data of tensor {tensor.name!r} is shorter than its shape needs")
            weights.stub_in_place(tensor, values, store)
    finally:
        for f in handles.values():
            f.close()


def load_model(source: Union[str, os.PathLike, onnx.ModelProto]) -> LoadedModel:
    """Read and check a model. Raises InputError with a one-line reason.

    Inside an active weight store (as in :func:`onnxprune.prune`) the returned model's large
    weights are stubs in the store: the protobuf stays small whatever the model's size.
    """
    store = weights.active()
    files = ()
    if isinstance(source, onnx.ModelProto):
        path, size = None, source.ByteSize()
        try:
            model = weights.detach(source)
        except ValueError as e:
            raise InputError(f"the model's weights are malformed: {e}") from e
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
            parsed = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf raises several types for garbage
            raise InputError(f"{path!r} is not an ONNX model (it does not parse: {type(e).__name__})") from e
        if not parsed.HasField("graph") or len(parsed.graph.node) == 0:
            raise InputError(f"{path!r} is not an ONNX model with a graph (no nodes)")
        folder = os.path.dirname(os.path.abspath(path))
        ext_size, ext_files = check_external_locations(parsed, folder)
        size = len(data) + ext_size
        del data
        files = (os.path.realpath(path),) + ext_files
        try:
            _load_external(parsed, folder, store)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot read the external data of {path!r}: {e}") from e
        try:
            model = weights.detach(parsed)
        except ValueError as e:
            raise InputError(f"{path!r}: {e}") from e
        del parsed  # its own copy of the inline weights goes now
    if store is not None:
        store.lean = weights.stored_bytes(model) > weights.LEAN_BYTES
    if len(model.graph.node) == 0:
        raise InputError("the model's graph is empty")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise InputError(
            f"opset {opset} is older than the oldest supported ({MIN_OPSET}); "
            "convert it first with onnx.version_converter"
        )
    try:
        onnx.checker.check_model(weights.checkable(model))
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__  # the checker's message spans lines
        raise InputError(f"the model fails the ONNX checker: {text[:300]}") from e
    if not any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node):
        raise InputError("the model has no Conv layer: nothing to prune")
    return LoadedModel(model=model, path=path, file_size=size, files=files)
