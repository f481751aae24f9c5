"""Stage 10: write the model atomically, never over its own input."""

from __future__ import annotations

import os
import tempfile

import onnx

from .errors import UsageError

TWO_GB = 2 ** 31 - 1


def check_output_path(out_path: str, in_path: str | None) -> None:
    """Fail early, before any work, if OUT cannot be written or is IN."""
    out_abs = os.path.abspath(out_path)
    folder = os.path.dirname(out_abs)
    if os.path.isdir(out_abs):
        raise UsageError(f"output {out_path!r} is a folder; give a file name")
    if in_path is not None:
        if out_abs == os.path.abspath(in_path) or (os.path.exists(out_abs) and os.path.samefile(out_abs, in_path)):
            raise UsageError("output is the input model; refusing to write over it")
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder!r} is not writable")


def save_atomic(model: onnx.ModelProto, out_path: str) -> int:
    """Write to a temporary file beside OUT, fsync, rename. Returns the bytes written."""
    out_abs = os.path.abspath(out_path)
    folder = os.path.dirname(out_abs)
    fd, tmp = tempfile.mkstemp(prefix=".onnxprune-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_abs)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return os.path.getsize(out_abs)
