"""Stage 10: write the model atomically, never over its own input.

A model goes to one file, or, when its input kept its weights in external data
or it would not fit in one protobuf (2 GB), to OUT and OUT.data beside it (one
data file, named relative to OUT). Either way every file is first written in
full to a temporary file beside its target and fsynced; then the targets are
renamed into place, with SIGINT and SIGTERM held back until both renames of an
external-data pair are done. An interruption or error before that removes the
temporary files and leaves any earlier OUT as it was.

Weights held in the weight store are streamed from their arrays to the file:
saving never builds a second copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from typing import BinaryIO, Iterable, List, Optional, Sequence

import numpy as np
import onnx

from . import weights
from .errors import UsageError

TWO_GB = 2 ** 31 - 1  # the most a protobuf parser reads as one message
ALIGN = 4096  # external data offsets, so that readers can map tensors page by page
TEMP_NAMES = {"prefix": ".onnxprune-", "suffix": ".tmp"}  # the temporary files beside a target


def data_path(out_path: str) -> str:
    """Where the external data of OUT goes: OUT.data, beside it."""
    return os.path.abspath(out_path) + ".data"


def _check_writable_file(path: str, what: str) -> None:
    """``path`` names a file (not a folder) in a folder that exists and can be written."""
    path_abs = os.path.abspath(path)
    folder = os.path.dirname(path_abs)
    if os.path.isdir(path_abs):
        raise UsageError(f"{what} {path!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{what} folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} folder {folder!r} is not writable")
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if len(os.fsencode(os.path.basename(path_abs))) > longest:
        raise UsageError(f"{what} file name is too long for its folder (at most {longest} bytes)")
    # a folder the permission bits call writable may still refuse files (/proc, /sys): try one,
    # named as the files this run writes are, before any work
    try:
        fd, probe = tempfile.mkstemp(**TEMP_NAMES, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what} folder {folder!r} is not writable ({e.strerror or e})") from None


def check_output_path(out_path: str, in_path: str | None, inputs: Iterable[Optional[str]] = ()) -> None:
    """Fail early, before any work, if OUT cannot be written or is IN, or if OUT (or OUT.data)
    is another file this run reads (``inputs``: --calib, --eval)."""
    out_abs = os.path.abspath(out_path)
    if in_path is not None and not os.path.isdir(out_abs):
        if out_abs == os.path.abspath(in_path) or (os.path.exists(out_abs) and os.path.samefile(out_abs, in_path)):
            raise UsageError("output is the input model; refusing to write over it")
    read = [f for f in inputs if f and os.path.isfile(f)]
    if _is_one_of(out_abs, read) or _is_one_of(data_path(out_abs), read):
        raise UsageError(f"output {out_path!r} (or its .data file) is a file this run reads (--calib or --eval); "
                         "give another name")
    _check_writable_file(out_path, "output")


def check_report_path(report_path: str, protected: Iterable[str]) -> None:
    """Fail if the JSON report cannot be written, or would replace a file this run reads or
    writes (``protected``: the model and its data files, OUT and OUT.data, --calib, --eval)."""
    if _is_one_of(os.path.abspath(report_path), [f for f in protected if f]):
        raise UsageError(f"--report {report_path!r} is a file this run reads or writes (the model or its "
                         "data, OUT, --calib or --eval); give another file")
    _check_writable_file(report_path, "--report")


def save_json_atomic(obj, path: str) -> None:
    """``obj`` as indented JSON at ``path``, replacing it whole or not at all."""
    text = json.dumps(obj, indent=2).encode()
    _commit([(os.path.abspath(path), lambda f: f.write(text))])


def _is_one_of(path: str, files: Iterable[str]) -> bool:
    for f in files:
        if os.path.realpath(path) == os.path.realpath(f):
            return True
        try:
            if os.path.exists(path) and os.path.exists(f) and os.path.samefile(path, f):
                return True
        except OSError:
            pass
    return False


def save_atomic(model: onnx.ModelProto, out_path: str, external_data: Optional[bool] = None,
                protect: Sequence[str] = ()) -> int:
    """Write ``model`` to ``out_path``; returns the bytes written (external data included).

    ``external_data``: write the weights to OUT.data (True), into OUT (False), or as
    needed (None): external data only when the model would not fit in one protobuf.
    ``protect``: files that must not be replaced (the input model and its data files).
    Large weights may be stubs of the active weight store.
    """
    out_abs = os.path.abspath(out_path)
    size = _stream_size(model)
    external = bool(external_data) or size > TWO_GB
    targets = [out_abs] + ([data_path(out_abs)] if external else [])
    for target in targets:
        if _is_one_of(target, protect):
            raise UsageError(f"{target!r} is a file of the input model; refusing to write over it")
        if os.path.isdir(target):
            raise UsageError(f"output {target!r} is a folder; give a file name")
    if not external:
        stale = _own_data_file(out_abs)
        _commit([(out_abs, lambda f: _write_single(model, f))])
        if stale is not None and not _is_one_of(stale, protect):
            # the replaced OUT's weights: nothing reads them any more
            try:
                os.unlink(stale)
            except OSError:
                pass
    else:
        location = os.path.basename(targets[1])
        header = weights.skeleton(model)

        def write_data(f: BinaryIO) -> None:
            offset = 0
            for t in header.graph.initializer:
                if not weights.is_stub(t):
                    continue
                values = weights.array(t)
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(memoryview(np.ascontiguousarray(values)).cast("B"))
                _point_at(t, location, offset, values.nbytes)
                offset += values.nbytes

        # the data first: the model's header records where each tensor landed
        _commit([(targets[1], write_data), (out_abs, lambda f: f.write(header.SerializeToString()))])
    return sum(os.path.getsize(t) for t in targets)


def _own_data_file(out_abs: str) -> Optional[str]:
    """OUT.data, where the model now at OUT (about to be replaced) keeps its weights in it."""
    data = data_path(out_abs)
    if not (os.path.isfile(out_abs) and os.path.isfile(data)):
        return None
    from .load import check_external_locations

    try:
        _, files = check_external_locations(onnx.load(out_abs, load_external_data=False), os.path.dirname(out_abs))
    except Exception:  # not a model we can read, or data outside its folder: leave its neighbours alone
        return None
    return data if _is_one_of(data, files) else None


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = tensor.external_data.add()
        e.key, e.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends.

    Python runs signal handlers in the main thread whichever thread the signal reached
    (onnxruntime's and BLAS's threads do not block it), so the handlers are swapped for
    one that only records the signal, and the signal is raised again afterwards. Off the
    main thread, where handlers cannot be set, the block is not protected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _commit(files) -> None:
    """``files``: (target, writer) pairs. Each writer fills a temporary file beside its
    target; all are fsynced, then renamed in order with signals held; on any failure
    or interruption before the renames every temporary file is removed."""
    temps: List[str] = []
    try:
        for target, writer in files:
            fd, tmp = tempfile.mkstemp(**TEMP_NAMES, dir=os.path.dirname(target))
            temps.append(tmp)
            try:
                os.fchmod(fd, _mode_for(target))
            except OSError:
                pass
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
        with _signals_held():
            for (target, _), tmp in zip(files, temps):
                os.replace(tmp, target)
    except BaseException:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for folder in {os.path.dirname(t) for t, _ in files}:
        _fsync_folder(folder)


def _mode_for(target: str) -> int:
    """An existing target's permissions, else what a plain open() would give (mkstemp's 0600
    would make the model unreadable to the rest of a pipeline)."""
    try:
        return os.stat(target).st_mode & 0o777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- one protobuf, streamed ------------------------------------------------------------------------
# A stub's bytes go straight from its array to the file. The fields are written in field
# number order, as SerializeToString writes them, so the file is byte for byte what
# serialising the materialised model would give.

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)  # length-delimited


def _part(message, keep) -> bytes:
    """The serialised fields of ``message`` whose number passes ``keep``."""
    out = type(message)()
    weights.copy_fields(message, out, lambda fd: keep(fd.number))
    return out.SerializeToString()


_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _plain(t: onnx.TensorProto) -> onnx.TensorProto:
    """A stub's fields as an inline tensor has them, without the data."""
    plain = onnx.TensorProto()
    plain.name = t.name
    plain.dims.extend(t.dims)
    plain.data_type = t.data_type
    if t.doc_string:
        plain.doc_string = t.doc_string
    return plain


def _tensor_parts(t: onnx.TensorProto):
    """(bytes before raw_data, the array, bytes after) of a stub as an inline tensor."""
    plain = _plain(t)
    values = np.ascontiguousarray(weights.array(t))
    return _part(plain, lambda n: n < _RAW), values, _part(plain, lambda n: n > _RAW)


def _framed_size(n: int) -> int:
    return n + len(_varint(n))


def _tensor_size(t: onnx.TensorProto) -> int:
    if not weights.is_stub(t):
        return t.ByteSize()
    return _plain(t).ByteSize() + len(_tag(_RAW)) + _framed_size(weights.nbytes_of(t))


def _stream_size(model: onnx.ModelProto) -> int:
    """The size of the model serialised as one protobuf, stubs filled in."""
    if not weights.has_stubs(model):
        return model.ByteSize()
    stubs = [t for t in model.graph.initializer if weights.is_stub(t)]
    # the skeleton counts each stub's external-data fields; a stub counts its bytes instead
    graph = model.graph.ByteSize()
    for t in stubs:
        graph += _framed_size(_tensor_size(t)) - _framed_size(t.ByteSize())
    return model.ByteSize() - _framed_size(model.graph.ByteSize()) + _framed_size(graph)


def _write_single(model: onnx.ModelProto, f: BinaryIO) -> None:
    if not weights.has_stubs(model):
        f.write(model.SerializeToString())
        return
    graph = model.graph
    parts = []  # per initializer: (bytes, ...) pieces, arrays written as they are
    graph_size = 0
    g_head, g_tail = _part(graph, lambda n: n < _INITIALIZER), _part(graph, lambda n: n > _INITIALIZER)
    graph_size += len(g_head) + len(g_tail)
    for t in graph.initializer:
        if weights.is_stub(t):
            head, values, tail = _tensor_parts(t)
            raw = _tag(_RAW) + _varint(values.nbytes)
            size = len(head) + len(raw) + values.nbytes + len(tail)
            parts.append((_tag(_INITIALIZER) + _varint(size) + head + raw, values, tail))
        else:
            data = t.SerializeToString()
            parts.append((_tag(_INITIALIZER) + _varint(len(data)) + data, None, b""))
            size = len(data)
        graph_size += len(_tag(_INITIALIZER)) + _framed_size(size)
    f.write(_part(model, lambda n: n < _GRAPH))
    f.write(_tag(_GRAPH) + _varint(graph_size))
    f.write(g_head)
    for head, values, tail in parts:
        f.write(head)
        if values is not None:
            f.write(memoryview(values).cast("B"))
        f.write(tail)
    f.write(g_tail)
    f.write(_part(model, lambda n: n > _GRAPH))
