"""Large weights live in NumPy arrays beside the protobufs, never inside them.

A model over 2 GB cannot be one serialised protobuf, and every ``CopyFrom``,
serialisation or onnxruntime session made from bytes copies every weight in it.
So inside :func:`onnxprune.prune` every initializer of at least ``STUB_BYTES``
lives in the active :class:`WeightStore` as a read-only array, and the
ModelProto carries a *stub* in its place: name, dims and type, no data, and an
external-data reference naming the store and the array's key. Copying a model
copies stubs and shares the arrays; graph surgery reads and writes arrays; only
saving (:mod:`onnxprune.save`) and :func:`materialize` put bytes back into a file
or a protobuf.

Stubs point at the location ``"."`` (a folder: any reader that tried to load
them fails loudly instead of reading something) and carry the key in the
``checksum`` field, which onnxruntime and the ONNX tools ignore.

Outside an active store (the stage functions called on their own, as the unit
tests do) nothing is stubbed and every helper here behaves like ``onnx``'s own.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from .errors import InternalError

STUB_BYTES = 64 * 2 ** 10  # initializers from this size on live in the store
# Models storing more than this run in onnxruntime sessions that read the store's arrays in
# place (no copy, but no graph optimisations); smaller ones get fully optimised sessions.
LEAN_BYTES = 512 * 2 ** 20
STUB_LOCATION = "."
_TAG = "onnxprune:"

# data types whose raw_data is exactly a little-endian NumPy array
_DTYPES = {
    TensorProto.FLOAT: "<f4", TensorProto.DOUBLE: "<f8", TensorProto.FLOAT16: "<f2",
    TensorProto.INT8: "i1", TensorProto.UINT8: "u1", TensorProto.INT16: "<i2", TensorProto.UINT16: "<u2",
    TensorProto.INT32: "<i4", TensorProto.UINT32: "<u4", TensorProto.INT64: "<i8", TensorProto.UINT64: "<u8",
    TensorProto.BOOL: "?",
}
_ONNX_TYPE = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightStore:
    """Arrays by key. Keys are never reused; an array goes when no key binds it any more."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = f"{os.getpid()}.{next(WeightStore._ids)}"
        self.arrays: Dict[str, np.ndarray] = {}
        self._keys = itertools.count()
        self.lean = False  # set by the loader from the model's size

    def add(self, array: np.ndarray) -> str:
        key = str(next(self._keys))
        self.arrays[key] = _frozen(array)
        return key

    def get(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            raise InternalError(f"weight {key} is no longer held (a model used after its weights were released)") from None

    def rebind(self, key: str, array: np.ndarray) -> None:
        self.arrays[key] = _frozen(array)

    def discard(self, key: str) -> None:
        self.arrays.pop(key, None)

    def retain(self, models: Iterable[onnx.ModelProto]) -> None:
        """Release every array that none of ``models`` refers to."""
        live = set()
        for m in models:
            live |= keys(m, self)
        for key in [k for k in self.arrays if k not in live]:
            del self.arrays[key]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


_active: contextvars.ContextVar[Optional[WeightStore]] = contextvars.ContextVar("onnxprune_weights", default=None)


def active() -> Optional[WeightStore]:
    return _active.get()


@contextlib.contextmanager
def activate(store: WeightStore) -> Iterator[WeightStore]:
    token = _active.set(store)
    try:
        yield store
    finally:
        _active.reset(token)


def _frozen(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, read-only array that owns its memory: it is shared with onnxruntime and
    between models, so nobody may change it in place, and a view must not keep a larger base alive."""
    a = np.asarray(array)
    if not a.flags.c_contiguous or (a.base is not None and getattr(a.base, "nbytes", a.nbytes) > a.nbytes):
        a = np.ascontiguousarray(a).copy()
    if a.flags.writeable:
        a.flags.writeable = False
    return a


# -- stubs ---------------------------------------------------------------------------------------

def _entry(tensor: TensorProto, key: str, value: str) -> None:
    e = tensor.external_data.add()
    e.key, e.value = key, value


def _stub_tag(tensor: TensorProto) -> Optional[str]:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for e in tensor.external_data:
        if e.key == "checksum" and e.value.startswith(_TAG):
            return e.value[len(_TAG):]
    return None


def is_stub(tensor: TensorProto) -> bool:
    return _stub_tag(tensor) is not None


def _key(tensor: TensorProto, store: Optional[WeightStore]) -> str:
    tag = _stub_tag(tensor)
    store_id, _, key = tag.rpartition(":")
    if store is None or store.id != store_id:
        raise InternalError(f"the weights of tensor {tensor.name!r} belong to a run that has ended")
    return key


def numpy_dtype(tensor: TensorProto) -> np.dtype:
    """The NumPy dtype whose bytes are this tensor's raw data (plain numeric types only)."""
    return np.dtype(_DTYPES[tensor.data_type])


def nbytes_of(tensor: TensorProto) -> int:
    dtype = _DTYPES.get(tensor.data_type)
    size = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    return size * np.dtype(dtype).itemsize if dtype else 0


def _stub(name: str, dims, data_type: int, store: WeightStore, key: str, doc: str = "") -> TensorProto:
    t = TensorProto()
    t.name = name
    t.dims.extend(int(d) for d in dims)
    t.data_type = data_type
    if doc:
        t.doc_string = doc
    t.data_location = TensorProto.EXTERNAL
    _entry(t, "location", STUB_LOCATION)
    _entry(t, "length", str(nbytes_of(t)))
    _entry(t, "checksum", f"{_TAG}{store.id}:{key}")
    return t


def storable(tensor: TensorProto) -> bool:
    return tensor.data_type in _DTYPES and tensor.data_location != TensorProto.EXTERNAL and nbytes_of(tensor) >= STUB_BYTES


def keys_of(tensors: Iterable[TensorProto], store: Optional[WeightStore] = None) -> set:
    store = store or active()
    return {_key(t, store) for t in tensors if is_stub(t)}


def keys(model: onnx.ModelProto, store: Optional[WeightStore] = None) -> set:
    return keys_of(model.graph.initializer, store)


def stored_bytes(model: onnx.ModelProto) -> int:
    return sum(nbytes_of(t) for t in model.graph.initializer if is_stub(t))


def has_stubs(model: onnx.ModelProto) -> bool:
    return any(is_stub(t) for t in model.graph.initializer)


# -- reading and writing tensors ------------------------------------------------------------------

def array(tensor: TensorProto) -> np.ndarray:
    """The values of an initializer: the shared read-only array of a stub, else a fresh array."""
    if is_stub(tensor):
        store = active()
        key = _key(tensor, store)  # raises when the store of this stub is not the active one
        return store.get(key).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _goes_to_store(values: np.ndarray) -> bool:
    return values.nbytes >= STUB_BYTES and values.dtype in _ONNX_TYPE


def make_tensor(values: np.ndarray, name: str) -> TensorProto:
    """An initializer holding ``values``: a stub in the active store when large, else inline."""
    values = np.asarray(values)
    store = active()
    if store is not None and _goes_to_store(values):
        return _stub(name, values.shape, _ONNX_TYPE[values.dtype], store, store.add(values))
    return numpy_helper.from_array(values, name)


def assign(tensor: TensorProto, values: np.ndarray, shared: Optional[set] = None) -> None:
    """Give ``tensor`` new values. A stub whose key no other model uses (not in ``shared``) is
    rebound in place, so its old array goes at once; otherwise the tensor gets a new key."""
    store = active()
    values = np.asarray(values)
    if (store is not None and shared is not None and is_stub(tensor) and _goes_to_store(values)
            and _ONNX_TYPE[values.dtype] == tensor.data_type):
        key = _key(tensor, store)
        if key not in shared:
            store.rebind(key, values)
            tensor.CopyFrom(_stub(tensor.name, values.shape, tensor.data_type, store, key, tensor.doc_string))
            return
    tensor.CopyFrom(make_tensor(values, tensor.name))


def _array_of_inline(tensor: TensorProto) -> np.ndarray:
    dtype = numpy_dtype(tensor)
    if tensor.HasField("raw_data"):
        data = tensor.raw_data  # one copy, as bytes: the array is a read-only view of it
        if len(data) != nbytes_of(tensor):
            raise ValueError(f"tensor {tensor.name!r} holds {len(data)} bytes; its shape needs {nbytes_of(tensor)}")
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor).astype(dtype, copy=False)


def stub_in_place(tensor: TensorProto, values: np.ndarray, store: WeightStore) -> None:
    """Turn ``tensor`` (of a model we own) into a stub for ``values``."""
    tensor.CopyFrom(_stub(tensor.name, tensor.dims, tensor.data_type, store, store.add(values), tensor.doc_string))


# -- whole models ---------------------------------------------------------------------------------

def copy_fields(src, dst, keep: Callable[[object], bool]) -> None:
    """Copy into ``dst`` the set fields of ``src`` whose descriptor passes ``keep``."""
    for fd, value in src.ListFields():
        if not keep(fd):
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def detach(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large inline initializers are stubs in the active store.

    ``model`` is not changed, and its weights are copied once (into the arrays), never into
    another protobuf. Without an active store the model is returned as it is.
    """
    store = active()
    if store is None:
        return model
    return _with_initializers(model, lambda t: _stub(t.name, t.dims, t.data_type, store,
                                                     store.add(_array_of_inline(t)), t.doc_string)
                              if storable(t) else t)


def _with_initializers(model: onnx.ModelProto, convert: Callable[[TensorProto], TensorProto]) -> onnx.ModelProto:
    """A copy of ``model`` with ``convert`` applied to each initializer: the rest of the
    protobuf is copied field by field, so the initializers themselves are never copied twice."""
    out = onnx.ModelProto()
    copy_fields(model, out, lambda fd: fd.name != "graph")
    copy_fields(model.graph, out.graph, lambda fd: fd.name != "initializer")
    out.graph.initializer.extend(convert(t) for t in model.graph.initializer)
    return out


def skeleton(model: onnx.ModelProto, location: Optional[str] = None) -> onnx.ModelProto:
    """A copy of ``model`` (stubs stay stubs), with the stubs' location changed if asked."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if location is not None:
        for t in out.graph.initializer:
            if is_stub(t):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = location
    return out


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """What to give ``onnx.checker``: the checker skips the existence test for external data
    whose location starts with '#', and it never reads the data."""
    return skeleton(model, "#onnxprune-weights") if has_stubs(model) else model


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A self-contained copy: every stub filled with its array's bytes (a copy of every weight)."""
    if not has_stubs(model):
        return model

    def filled(t: TensorProto) -> TensorProto:
        if not is_stub(t):
            return t
        inline = numpy_helper.from_array(np.asarray(array(t)), t.name)
        if t.doc_string:
            inline.doc_string = t.doc_string
        return inline

    return _with_initializers(model, filled)


def session_arrays(model: onnx.ModelProto) -> List[Tuple[str, np.ndarray]]:
    return [(t.name, array(t)) for t in model.graph.initializer if is_stub(t)]


# -- onnx-graphsurgeon ----------------------------------------------------------------------------

class StoredValues(gs.ir.tensor.LazyValues):
    """A constant's values in the store: loading returns the shared array, no copy."""

    def load(self):
        return array(self.tensor)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` whose constants read stubs from the store."""
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(tensor, gs.Constant) and type(values) is gs.ir.tensor.LazyValues and is_stub(values.tensor):
            tensor._values = StoredValues(values.tensor)
            tensor.data_location = None
    return graph


def export_graph(graph: gs.Graph, **kwargs) -> onnx.ModelProto:
    """``gs.export_onnx`` that puts large constants in the store instead of copying them into the
    protobuf. Afterwards the graph's constants refer to the store, not to arrays of their own."""
    store = active()
    if store is not None:
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, gs.ir.tensor.LazyValues):
                continue  # untouched stored values keep their key; other lazy values export as they are
            values = np.asarray(tensor._values)
            if _goes_to_store(values):
                tensor._values = StoredValues(make_tensor(values, tensor.name))  # a stub: the store is active
                tensor.data_location = None
    kwargs.setdefault("do_type_check", False)
    return gs.export_onnx(graph, **kwargs)
