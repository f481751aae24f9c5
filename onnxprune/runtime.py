"""onnxruntime sessions: provider choice, intermediate outputs, batched runs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from threadpoolctl import threadpool_info, threadpool_limits

from . import weights
from .errors import InputError, InternalError, OutOfMemory, UsageError

ort.set_default_logger_severity(3)  # provider fallbacks are reported by us, in one line


def blas_single_thread():
    """Single-threaded BLAS for the per-batch statistics that run between onnxruntime calls.

    Those products are small; with several BLAS threads on a machine whose cores are
    busy (onnxruntime's own threads, other jobs), OpenBLAS's thread hand-offs made them
    up to a thousand times slower (measured on 2 cores). One thread is never slow.
    """
    return threadpool_limits(limits=1, user_api="blas")


# Multiply-adds from which one product is worth every core: at 2 x 10^8 it takes about a
# millisecond on one, far above what handing work to other threads costs.
LARGE_PRODUCT = 2e8


def blas_threads_for(work: float):
    """Every core's BLAS for a product of ``work`` multiply-adds, if it is large; the caller's
    single thread otherwise. The refit's Gram matrices of wide layers are such products:
    1.8x faster on both of 2 cores. OpenBLAS's threads then spin for a while and slow the
    onnxruntime run that follows, so the refit of ResNet-18 at 224x224 gained less: 12.3-13.1 s
    -> 11.4-12.2 s (Gram products 6.2 -> 4.1 s, onnxruntime 3.6 -> 5.0 s)."""
    if work < LARGE_PRODUCT or _BLAS_THREADS <= 1:
        return contextlib.nullcontext()
    return threadpool_limits(limits=_BLAS_THREADS, user_api="blas")


def _blas_threads() -> int:
    """BLAS threads as the process started with them (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or
    the library's own default), within the cores this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    counts = [i.get("num_threads", 1) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, min([cores] + counts))


_BLAS_THREADS = _blas_threads()  # read at import, before any limit of ours is set


def _cuda_usable() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")  # the driver: absent on machines without a GPU
    except OSError:
        return False
    return True


_CUDA_STARTS: Optional[bool] = None


def _cuda_starts() -> bool:
    """Whether onnxruntime's CUDA provider starts, tried once per process on a one-node model.

    A GPU and its driver are not enough: the provider also needs the CUDA and cuDNN libraries
    of the major version onnxruntime-gpu was built for, and without them onnxruntime quietly
    runs on the CPU alone."""
    global _CUDA_STARTS
    if _CUDA_STARTS is None:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        probe.ir_version = 8
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.set_default_logger_severity(4)  # its failure to load the provider is our one line to say
        try:
            sess = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, enable_fallback=0,
                                        providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            _CUDA_STARTS = on_gpu(sess)
        except Exception:  # onnxruntime's own error types: any failure means no CUDA here
            _CUDA_STARTS = False
        finally:
            ort.set_default_logger_severity(3)
    return _CUDA_STARTS


def choose_providers(device: str) -> Tuple[List[str], str]:
    """Providers for ``device`` (auto|cpu|cuda) and a one-line description."""
    if device == "cpu":
        return ["CPUExecutionProvider"], "CPU (onnxruntime CPUExecutionProvider)"
    if _cuda_usable():
        if _cuda_starts():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA GPU (onnxruntime CUDAExecutionProvider)"
        if device == "cuda":
            raise UsageError("--device cuda: onnxruntime's CUDA provider did not start (are the CUDA and cuDNN "
                             "libraries onnxruntime-gpu was built for installed?); use --device cpu")
        return ["CPUExecutionProvider"], ("CPU (onnxruntime CPUExecutionProvider; a GPU is present but "
                                          "onnxruntime's CUDA provider did not start)")
    if device == "cuda":
        raise UsageError("--device cuda: no usable CUDA GPU found by onnxruntime")
    return ["CPUExecutionProvider"], "CPU (onnxruntime CPUExecutionProvider; no GPU found)"


def _cpu_has_avx512() -> bool:
    try:  # NumPy's own CPU feature detection, where this NumPy exposes it
        from numpy._core._multiarray_umath import __cpu_features__
        return bool(__cpu_features__.get("AVX512F"))
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def kernel_channel_block(providers: Sequence[str]) -> Tuple[int, int]:
    """The default rounding on ``providers``: (block, narrow unit), kept counts being multiples
    of the block, and of the narrow unit in groups narrower than two blocks (0: no exception).

    onnxruntime's x86 CPU convolutions run in the NCHWc layout, whose channel block is the
    vector width: 16 floats with AVX-512. A layer whose channel count is not a multiple of the
    block runs as slowly as at the next multiple (measured: 24 channels cost what 32 do), so
    cuts between two multiples cost accuracy and buy no time; below one block another path
    is taken, on which a 16-channel layer halved to 8 ran 17-43% faster on 28x28 maps, so
    narrow groups are cut in half-blocks (bench/results/*-speed.md). Elsewhere (AVX2 CPUs,
    whose block is 8, other CPUs, CUDA) multiples of 8, the rounding measured best before the
    block was known."""
    if providers and providers[0] == "CPUExecutionProvider" and _cpu_has_avx512():
        return 16, 8
    return 8, 0


def make_session(model: onnx.ModelProto, providers: Sequence[str], threads: int = 0,
                 optimize: bool = False, ours: bool = False, optimised_to: Optional[str] = None) -> ort.InferenceSession:
    """An onnxruntime session for ``model``, whose large weights may be stubs in the weight store.

    Small models (and ``optimize``, for latency) get onnxruntime's full graph optimisations;
    stored weights are handed over as external initializers, which onnxruntime copies once.
    Large models (the store's ``lean`` mode) share the store's arrays with onnxruntime in place:
    no copy, and so no optimisation that would rewrite a weight and no pre-packing, which would
    copy it; a serialised model over 2 GB could not be made at all.

    ``optimised_to``: a path where onnxruntime writes the graph it optimised (its weights in a
    file beside it), to read what it runs (:mod:`onnxprune.kernels`).
    """
    opts = ort.SessionOptions()
    if optimised_to:
        opts.optimized_model_filepath = optimised_to
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      os.path.basename(optimised_to) + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    opts.log_severity_level = 3
    # onnxruntime's threads otherwise spin for a while after each run, starving the NumPy
    # work (statistics, solves) that follows every batch on small machines
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    values = []
    store = weights.active()
    cuda = bool(providers) and providers[0] == "CUDAExecutionProvider"
    if weights.has_stubs(model):
        arrays = weights.session_arrays(model)
        values = [ort.OrtValue.ortvalue_from_numpy(a) for _, a in arrays]
        # stubs name the location "."; resolved against a folder that surely exists, never read
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      os.path.dirname(os.path.abspath(__file__)))
        if store is not None and store.lean and not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.add_session_config_entry("session.disable_prepacking", "1")
            if cuda:
                # the CUDA provider reads weights (a Gemm's, at least) while it partitions the
                # graph, before initializers handed over in place are bound, and failed on the
                # stubs (an H100 machine, onnxruntime-gpu 1.31): it gets them as in-memory
                # external data, which onnxruntime copies (peak 2.9x the weights, not 2x)
                opts.add_external_initializers([name for name, _ in arrays], values)
            else:
                for (name, _), value in zip(arrays, values):
                    opts.add_initializer(name, value)
        else:
            opts.add_external_initializers([name for name, _ in arrays], values)
    try:
        # no fallback: onnxruntime would print a block of text on stdout and retry on the CPU,
        # where its error is ours to say in one line
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, enable_fallback=0,
                                    providers=_with_options(providers, optimize))
    except Exception as e:  # the model, not us: an IR version, op or type onnxruntime does not have
        text = ort_message(e)
        if _says_out_of_memory(text):  # the weights, on a GPU smaller than the model needs
            where = " on the GPU: use --device cpu" if cuda else ""
            raise OutOfMemory(f"out of memory loading the model into onnxruntime{where}") from e
        if cuda:  # with no fallback, the GPU's failures land here too
            text += " (on the CUDA provider: --device cpu may load it)"
        if ours:  # a graph onnxprune made from one onnxruntime already ran: the fault is ours
            raise InternalError(f"onnxruntime cannot load a model onnxprune made (nothing written): {text}") from e
        if "is not a registered function/op" in text:
            text += " (a custom op: onnxprune does not load custom op libraries)"
        raise InputError(f"onnxruntime cannot load the model: {text}") from e
    # onnxruntime reads these arrays for as long as the session lives, without holding them
    sess._onnxprune_initializers = values
    sess._onnxprune_ours = ours
    if cuda and not on_gpu(sess):
        # the CUDA libraries failed to load after all: say so rather than pretend
        raise UsageError("onnxruntime could not start its CUDA provider; use --device cpu")
    return sess


def _with_options(providers: Sequence[str], timed: bool) -> list:
    """``providers`` as onnxruntime takes them, with the CUDA provider's options for sessions
    onnxprune works with (``timed``: latency measurement keeps onnxruntime's defaults).

    By default cuDNN tries every convolution algorithm on each input shape a session meets; the
    statistics, refit and verification make dozens of short-lived sessions, each of which meets
    its shape anew (one shape each: keeps_shapes). The heuristic choice costs a session's first
    run 0.6-1.7 s on MobileNetV2 at 224x224 against 1.1-2.7 s for the search, and cut the default
    conversion on an H100 from 33.8 to 23.3 s (MobileNetV2) and 8.5 to 6.9 s (ResNet-18), the
    fidelity the same (2026-11-22, before keeps_shapes). Timed sessions keep the exhaustive
    search a deployment would use."""
    if timed or not providers or providers[0] != "CUDAExecutionProvider":
        return list(providers)
    return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})] + list(providers[1:])


def expose(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return out


def ort_message(e: BaseException, limit: int = 300) -> str:
    """onnxruntime's error as one readable line: no error-code prefix, C++ source location or
    function signature."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    m = re.search(r"\S+\.(?:cc|cpp|h):\d+ ", text)
    if m:
        rest = text[m.end():]
        sig = re.match(r"[\w:~<>,*& ]+\(", rest)  # a function signature: skip it, parentheses balanced
        if sig:
            depth, i = 0, sig.end() - 1
            for i in range(sig.end() - 1, len(rest)):
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                if depth == 0:
                    break
            rest = re.sub(r"^\s*const\b", "", rest[i + 1:])
        text = (text[:m.start()] + rest).strip()
    return text[:limit]


def run_feeds(sess: ort.InferenceSession, feeds: dict, outputs: Optional[List[str]] = None,
              batch_size: Optional[int] = None) -> List[np.ndarray]:
    """``sess.run`` with onnxruntime's failures as one-line InputErrors, InternalErrors for a
    session on a graph onnxprune made (``make_session(..., ours=True)``); running out of memory
    is the user's to mend either way (``batch_size``, where known, goes into that message)."""
    try:
        return sess.run(outputs, feeds)
    except Exception as e:  # onnxruntime raises its own exception types per failure
        text = ort_message(e)
        gpu = on_gpu(sess)
        out_of_memory(e, text, batch_size, gpu)
        if gpu:
            text += " (on the CUDA provider: --device cpu may run it)"
        if getattr(sess, "_onnxprune_ours", False):
            raise InternalError(f"onnxruntime failed to run a model onnxprune made (nothing written): {text}") from e
        raise InputError(f"onnxruntime failed to run the model: {text}") from e


# How onnxruntime says it ran out of memory: its arena and the C++ runtime on the host, the
# CUDA provider's calls in two spellings, the CUDA driver (lower case compared)
_OUT_OF_MEMORY = ("failed to allocate", "bad_alloc", "out of memory", "cudaerrormemoryallocation",
                  "cuda_error_out_of_memory")


def _says_out_of_memory(text: str) -> bool:
    return any(words in text.lower() for words in _OUT_OF_MEMORY)


def on_gpu(sess: ort.InferenceSession) -> bool:
    """Whether ``sess`` runs on onnxruntime's CUDA provider."""
    return sess.get_providers()[0] == "CUDAExecutionProvider"


def keeps_shapes(sess: ort.InferenceSession) -> bool:
    """Whether the runs of ``sess`` should all have one input shape, the last batch padded up to
    the others (its last image repeated; the callers drop what the padding computes).

    On the CUDA provider every new input shape makes cuDNN choose each convolution's kernels
    again, and onnxruntime remembers the choice for the last shape only. On an H100
    (onnxruntime-gpu 1.31, heuristic choice), a run at a new shape cost MobileNetV2 at 224x224
    0.6-1.7 s and ResNet-18 about 50 ms, against 1-10 ms at the shape of the run before; the
    refit's capture, which ran the original a few images at a time with a shorter last run,
    took 9.7-12.4 s of a 28.7-30.3 s conversion (bench/results/2026-11-22-scale-cost-cuda.md). On
    the CPU a smaller batch costs less, so it is not padded."""
    return on_gpu(sess)


def out_of_memory(error: BaseException, text: str, batch_size: Optional[int] = None, gpu: bool = False) -> None:
    """Raise OutOfMemory if onnxruntime's ``error`` (its message ``text``) says it ran out; ``gpu``:
    the session ran on the CUDA provider, whose arena reports a failed cudaMalloc as 'Failed to
    allocate', without naming the GPU."""
    if _says_out_of_memory(text):
        of = f" of {batch_size}" if batch_size is not None else ""
        other = " or use --device cpu" if gpu or "cuda" in text.lower() else ""
        raise OutOfMemory(f"out of memory running a batch{of}: lower --batch-size{other}") from error


def run(sess: ort.InferenceSession, input_name: str, batch: np.ndarray, outputs: Optional[List[str]] = None) -> List[np.ndarray]:
    return run_feeds(sess, {input_name: batch}, outputs, len(batch))


class Overlapped:
    """Each batch's NumPy work done in one background thread while the caller runs onnxruntime
    on the next batch: the two release the GIL, and on a small machine neither keeps every
    core busy by itself (onnxruntime's small ops run on one thread, a batch's statistics on
    one BLAS thread). Measured on 2 cores, the calibration stage
    (median of 12): mobilenetv1_fmnist 76 -> 59 ms, resnet20_fmnist 88 -> 72 ms, alexnet_mnist
    42 -> 37 ms (plain passes 23-40 ms); ResNet-18 and MobileNetV2 at 224x224 unchanged. The
    refit's loop was slower so (resnet20 346 -> 370 ms, alexnet 261 -> 305 ms: its patch
    products and onnxruntime's threads then fight over the two cores), and runs in line.

    Work items run one at a time and in the order given, so they accumulate what they would in
    line, in the same order; only BLAS may round differently on another thread's buffers (the
    benchmark models' pruned weights moved by at most 1e-4 relative, the same channels kept),
    and the same way on every run. :meth:`submit` first waits for the previous item, so one
    batch is in flight at most (memory grows by one batch's outputs, not more); an item's
    exception is raised in the caller at the next :meth:`submit`, :meth:`wait` or at the end of
    the ``with`` block. Leaving the block waits for the last item, so nothing runs on once the
    caller has cleaned up."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onnxprune-batch")
        self._pending = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "Overlapped":
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)  # an error in the caller: let the item in flight finish, unread
