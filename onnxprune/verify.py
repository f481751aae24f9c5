"""Stage 9: prove the pruned model is valid and measure how closely it follows the original."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import onnx

from . import weights
from .data import CalibrationSet, pad_batch
from .errors import InputError, InternalError, OutOfMemory
from .progress import Progress, silent
from .runtime import expose, keeps_shapes, make_session, on_gpu, ort_message, out_of_memory, run
from .segments import real_rows, rows_seen


def _io_signature(vis) -> List[tuple]:
    out = []
    for vi in vis:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out.append((vi.name, tt.elem_type, dims))
    return out


def check_graph(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The full ONNX check and the original's input/output signature (no run)."""
    try:
        onnx.checker.check_model(weights.checkable(pruned), full_check=True)
    except Exception as e:
        raise InternalError(f"the pruned model fails the ONNX checker (nothing written): {str(e).splitlines()[0]}") from e
    from .prepare import data_inputs

    if _io_signature(data_inputs(pruned.graph)) != _io_signature(data_inputs(original.graph)):
        raise InternalError("the pruned model's inputs differ from the original's (nothing written)")
    if _io_signature(pruned.graph.output) != _io_signature(original.graph.output):
        raise InternalError("the pruned model's outputs differ from the original's (nothing written)")


def check_outputs(original: onnx.ModelProto, outs_old: Sequence[np.ndarray], outs_new: Sequence[np.ndarray]) -> None:
    """The pruned model's graph outputs (in ``original``'s order) have the original's shapes and types."""
    for vi, a, b in zip(original.graph.output, outs_old, outs_new):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise InternalError(f"output {vi.name!r} changed shape {a.shape} -> {b.shape} (nothing written)")


def _session_checked(model: onnx.ModelProto, providers: List[str]):
    try:
        return make_session(model, providers)
    except OutOfMemory:  # the user's to mend, not a fault of the pruned model
        raise
    except Exception as e:
        cause = e.__cause__ or e  # onnxruntime's own error, under make_session's InputError
        text = ort_message(cause)
        raise InternalError(f"onnxruntime cannot load the pruned model (nothing written): {text}") from e


def _run_checked(sess, input_name: str, batch: np.ndarray, names: Optional[List[str]] = None) -> List[np.ndarray]:
    try:
        return sess.run(names, {input_name: batch})
    except Exception as e:
        text = ort_message(e)
        out_of_memory(e, text, len(batch), on_gpu(sess))
        raise InternalError(f"onnxruntime cannot run the pruned model (nothing written): {text}") from e


@dataclass
class Fidelity:
    images: int
    top1_agreement: Optional[float]  # share of images where the arg-max class is unchanged
    relative_error: float  # ||pruned - original|| / ||original|| over all outputs
    held_out: bool  # False when too few images to hold any out


def is_classifier(out: np.ndarray) -> bool:
    """(N, K) scores, or (N, K, 1, 1) as fully convolutional classifiers give them."""
    return out.ndim >= 2 and out.shape[1] > 1 and all(d == 1 for d in out.shape[2:])


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def compared_tensors(model: onnx.ModelProto) -> List[str]:
    """What fidelity and the output payoff compare: each floating-point output, or the input of
    the Softmax that makes it (a saturated softmax hides changes in the scores that a later
    calibration may expose), each once: a model that returns logits and probabilities is
    compared on its logits, one that adds an integer ArgMax label on its scores. All outputs
    where none is floating point."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = []
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        if elem and elem not in FLOAT_TYPES:
            continue
        node = producer.get(out.name)
        name = node.input[0] if node is not None and node.op_type in ("Softmax", "LogSoftmax") else out.name
        if name not in names:
            names.append(name)
    return names or [o.name for o in model.graph.output]


def per_image(values: Sequence[np.ndarray], images: int, all_if_none: bool = True) -> List[int]:
    """Which compared outputs have one row per image (a constant output, anchors say, does not
    change with the channels); all of them where none has, unless ``all_if_none`` is False."""
    rows = [i for i, a in enumerate(values) if a.ndim and a.shape[0] == images]
    return rows if rows or not all_if_none else list(range(len(values)))


def one_class_score(values: Sequence[np.ndarray]) -> bool:
    """Whether compared outputs are class scores, read as such (top-1, log-probabilities):
    exactly one output, of shape (N, K) or (N, K, 1, 1). A detector's boxes and scores, or
    any several outputs, are compared by distance only."""
    return len(values) == 1 and is_classifier(values[0])


def fidelity(original: onnx.ModelProto, candidates: Sequence[onnx.ModelProto], cal: CalibrationSet,
             providers: List[str], progress: Progress = silent) -> List[Fidelity]:
    """How closely each candidate follows ``original`` on the held-out calibration images (on
    the fitting images where none are held out), in one pass: the original runs once per batch.

    The pass is also each candidate's onnxruntime check, after :func:`check_graph`: one that
    onnxruntime cannot load or run, or whose graph outputs differ in shape or type from the
    original's on the first batch, raises an InternalError. (A separate run on one batch
    cost two more sessions: 0.5 s of ResNet-18's 1.5 s of verification at 224x224.)"""
    held_out = len(cal.holdout) > 0
    indices = cal.holdout if held_out else cal.fit
    names = compared_tensors(original)
    graph_outputs = [o.name for o in original.graph.output]
    fetched = graph_outputs + [n for n in names if n not in graph_outputs]  # first batch: every output too
    at = [fetched.index(n) for n in names]
    s_new = [_session_checked(expose(c, names), providers) for c in candidates]
    s_old = make_session(expose(original, names), providers)
    # every batch the size of the first (runtime.keeps_shapes); real_rows drops the padding's rows
    steady = min(cal.batch_size, len(indices)) if keeps_shapes(s_old) else 0
    agree = [0] * len(candidates)
    # per compared output, made with the first batch: the original's summed squares (norm) and
    # each candidate's summed squared error (err)
    err = [None] * len(candidates)
    norm = None
    total = 0
    classifier = kept = None
    with progress("measuring fidelity", len(indices)) as update:
        for b, batch in enumerate(cal.batches(indices)):
            real = cal.real_count(b, indices)
            batch = pad_batch(batch, steady)
            first = b == 0
            outs = run(s_old, cal.spec.name, batch, fetched if first else names)
            if first:
                reference_outputs = outs[: len(graph_outputs)]
                outs = [outs[k] for k in at]
            if kept is None:
                kept = per_image(outs, len(batch))
                # rows of each compared output per image: 1, H x W where axis 0 folds the
                # pixels in, 0 for an output that is not per image (compared whole)
                rows = [rows_seen(outs[i], len(batch)) for i in kept]
                norm = np.zeros(len(kept))
                err = [np.zeros(len(kept)) for _ in candidates]
            old = [np.asarray(real_rows(outs[i], r, real), np.float64) for i, r in zip(kept, rows)]
            norm += [float((a ** 2).sum()) for a in old]
            if classifier is None:
                classifier = one_class_score(old)
            top1 = old[0].argmax(1) if classifier else None
            for i, sess in enumerate(s_new):
                outs = _run_checked(sess, cal.spec.name, batch, fetched if first else names)
                if first:
                    check_outputs(original, reference_outputs, outs[: len(graph_outputs)])
                    outs = [outs[k] for k in at]
                new = [np.asarray(real_rows(outs[j], r, real), np.float64) for j, r in zip(kept, rows)]
                err[i] += [float(((a - c) ** 2).sum()) for a, c in zip(old, new)]
                if classifier:
                    agree[i] += int((top1 == new[0].argmax(1)).sum())
            total += real
            update(real)
    return [Fidelity(total, a / total if classifier and total else None, _relative_error(e, norm), held_out)
            for a, e in zip(agree, err)]


def _relative_error(err: Optional[np.ndarray], norm: Optional[np.ndarray]) -> float:
    """The root of the mean over compared outputs of each one's squared error over its own
    squares: one output's relative error where there is one; with several (a detector's heads,
    logits beside a feature map) each counts alike, so a large output does not hide a small one
    that is far off. An output that is all zeros counts its absolute error."""
    if err is None:
        return 0.0
    share = np.where(norm > 0, err / np.where(norm > 0, norm, 1.0), err)
    return float(np.sqrt(share.mean()))


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, providers: List[str], batch_size: int = 256) -> float:
    """Top-1 accuracy of the first output against integer labels. A model with a fixed batch
    size is run at that size, its last batch padded (the padding's outputs are dropped), and so
    is one on the CUDA provider (runtime.keeps_shapes)."""
    sess = make_session(model, providers)
    first = sess.get_inputs()[0]
    name = first.name
    fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) and first.shape[0] > 0 else None
    step = fixed or batch_size
    steady = fixed or (min(step, len(x)) if keeps_shapes(sess) else 0)
    correct = 0
    for start in range(0, len(x), step):
        batch = np.ascontiguousarray(x[start:start + step])
        real = len(batch)
        out = run(sess, name, pad_batch(batch, steady))[0][:real]
        if is_classifier(out):
            out = out.reshape(len(out), -1)  # (N, K, 1, 1) from a fully convolutional classifier
        if start == 0 and (out.ndim != 2 or int(y.max()) >= out.shape[1]):
            raise InputError(f"--eval: the labels go up to {int(y.max())}, but the model's first output "
                             f"{tuple(out.shape[1:])} is not one score per class for them")
        correct += int((out.argmax(1) == y[start:start + real]).sum())
    return correct / len(x)
