"""Stage 4: stream calibration batches through onnxruntime and accumulate the
statistics that later stages need, per channel of each tensor.

For each requested tensor: the mean, the mean absolute value and the
second-moment matrix of its channels, pooled over the batch and pixels (a
flattened (N, C * P) tensor is viewed as (N, C, P) when asked to), as a full
matrix up to ``FULL_GRAM_LIMIT`` channels and the diagonal beyond. Means are
taken over every pixel; the second moments over a sample of pixels, the same share of
every batch, spread over its images and positions, of at most ``GRAM_SAMPLES_PER_CHANNEL``
per channel over the whole calibration (or ``GRAM_MIN_SAMPLES``, where that is more):
a (C, C) estimate needs a few times C samples, not the hundreds of thousands a
high-resolution map has, and its product would otherwise cost as much as the
layer that reads the map (a 1x1 conv: C x C' per pixel). Only
running sums in float64 are kept: memory grows with the batch and the channel
counts, never with the number of calibration images.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import onnx

from .data import CalibrationSet, pad_batch
from .errors import InputError
from .progress import Progress, silent
from .runtime import Overlapped, blas_single_thread, keeps_shapes, make_session, run_feeds

FULL_GRAM_LIMIT = 4096
# Over the whole calibration, not per batch: per batch (64 per channel, before), the smaller the
# batches the more samples, and MobileNetV2 at 224x224 in batches of 8 took 1664 per channel,
# 4.3 G multiply-adds of Grams per batch against 2.4 G for the network (its statistics 3.6x a
# plain pass; 2.6x with these). On the accuracy benchmark (7 batches of 32, where 64 a batch
# was 448 per channel) the default's 20 cells lose 14.19 points in all, as before, each within
# 0.19 point of what it lost then.
GRAM_SAMPLES_PER_CHANNEL = 32
GRAM_MIN_SAMPLES = 16384  # narrow layers keep this many: their Grams cost little


def _gram_cap(channels: int, batches: int) -> int:
    """Samples per batch that the second moments of ``channels`` channels take at most, when the
    calibration comes in ``batches`` batches."""
    return -(-max(GRAM_SAMPLES_PER_CHANNEL * channels, GRAM_MIN_SAMPLES) // max(batches, 1))


@functools.lru_cache(maxsize=256)
def _positions(images: int, pixels: int, count: int):
    """``count`` (image, pixel) pairs spread evenly over a batch: the same for every batch of
    the same size, so computed once."""
    return np.divmod(np.linspace(0, images * pixels - 1, count).astype(np.int64), pixels)


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype) -> np.ndarray:
    ones = np.ones(n, dtype)
    ones.flags.writeable = False  # one cached vector is shared by every call
    return ones


PIXEL_SUMS_BY_BLAS = 4096  # pixels per channel up to which a map's sums go through BLAS


def _pixel_sums(x3: np.ndarray) -> np.ndarray:
    """(N, C) sums of an (N, C, P) map over its pixels. Small maps: one matrix-vector product
    (BLAS), 3x faster than NumPy's reduction along the last axis on 28x28 maps, whose
    per-row cost it is. Larger ones keep that reduction, pairwise and so more exact
    in float32 over long rows. float16 maps are summed in float32: in float16 a channel's
    sum over one image passes 65504 (and reads as an overflow) long before any activation does."""
    if (not x3.flags.c_contiguous or x3.dtype not in (np.float32, np.float64)
            or x3.shape[2] > PIXEL_SUMS_BY_BLAS):
        return x3.sum(axis=2, dtype=np.float64 if x3.dtype == np.float64 else np.float32)
    n, c, p = x3.shape
    return (x3.reshape(n * c, p) @ _ones(p, x3.dtype)).reshape(n, c)


@dataclass
class TensorStats:
    count: int = 0  # samples x pixels accumulated
    gram_count: int = 0  # of which the second moments saw
    sum: Optional[np.ndarray] = None
    abs_sum: Optional[np.ndarray] = None
    gram: Optional[np.ndarray] = None  # sum of x x^T (full) or of x^2 (diagonal, 1-D)
    gram_sum: Optional[np.ndarray] = None  # sum of x over the samples the Gram saw
    absolute: bool = True  # keep abs_sum (only the activation criterion reads it; it costs a pass)
    batches: int = 1  # in the whole calibration: the Gram's samples are spread over them

    def _start(self, c: int) -> None:
        if self.sum is None:
            self.sum, self.abs_sum, self.gram_sum = np.zeros(c), np.zeros(c), np.zeros(c)
            self.gram = np.zeros((c, c)) if c <= FULL_GRAM_LIMIT else np.zeros(c)

    def add(self, x: np.ndarray) -> None:
        """``x``: (N, C, ...) for one batch. No transposed copy of a whole map is made: the sums run
        along its pixels in place, the second moments on a sample gathered as (samples, C)."""
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        p = x3.shape[2]
        self._start(c)
        self.count += n * p
        # float32 along the pixels of one image, float64 across images and batches
        self.sum += _pixel_sums(x3).sum(axis=0, dtype=np.float64)
        if self.absolute:
            self.abs_sum += _pixel_sums(np.abs(x3)).sum(axis=0, dtype=np.float64)
        cap = _gram_cap(c, self.batches)
        if n * p > cap:
            # evenly spaced over images x pixels; the stride is not a whole number of pixels,
            # so every image contributes different positions
            image, pixel = _positions(n, p, cap)
            sample = np.asarray(x3[image, :, pixel], dtype=np.float32)  # (cap, C)
        else:
            sample = np.ascontiguousarray(x3.transpose(0, 2, 1), dtype=np.float32).reshape(n * p, c)
        self.gram_count += sample.shape[0]
        # in float64 (a float32 sum moved Shapley values by 1e-6): einsum's loop is twice as fast
        # as sum(axis=0) at it on these (samples, C) blocks
        self.gram_sum += np.einsum("ij->j", sample, dtype=np.float64)
        if self.gram.ndim == 2:
            self.gram += sample.T @ sample
        else:
            self.gram += np.einsum("ij,ij->j", sample, sample, dtype=np.float64)

    def add_reduced(self, sums: np.ndarray, abs_sums: Optional[np.ndarray], gram: np.ndarray,
                    gram_sum: np.ndarray, pixels: int, sampled: int) -> None:
        """One batch reduced inside onnxruntime (:class:`_StatsGraph`): per-image channel sums
        (N, C) over ``pixels`` positions each, and the Gram and sum of ``sampled`` samples."""
        n, c = sums.shape
        self._start(c)
        self.count += n * pixels
        self.sum += sums.sum(axis=0, dtype=np.float64)
        if self.absolute and abs_sums is not None:
            self.abs_sum += abs_sums.sum(axis=0, dtype=np.float64)
        self.gram_count += sampled
        self.gram_sum += gram_sum
        self.gram += gram  # (C, C), or the (C,) diagonal

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def mean_abs(self) -> np.ndarray:
        if not self.absolute:
            raise ValueError("mean |x| was not collected (collect_stats(..., absolute=True))")
        return self.abs_sum / self.count

    def second_moment(self) -> np.ndarray:
        """Uncentred E[x x^T] (or E[x^2] when only the diagonal is kept)."""
        return self.gram / self.gram_count

    def covariance(self) -> np.ndarray:
        """Centred second moments: a (C, C) matrix, or the (C,) variances when only the diagonal is kept.
        Centred on the mean of the samples the Gram saw, so that the estimate stays positive
        semi-definite."""
        mu = self.gram_sum / self.gram_count
        if self.gram.ndim == 2:
            return self.gram / self.gram_count - np.outer(mu, mu)
        return self.gram / self.gram_count - mu * mu


@dataclass
class ChannelStats:
    tensors: Dict[str, TensorStats] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]


class _Reduced(NamedTuple):
    """A tensor reduced inside onnxruntime: the names of its outputs, and how it is sampled."""
    name: str
    sums: str  # (N, C) channel sums over all pixels
    abs_sums: Optional[str]  # (N, C) sums of |x|, where asked
    gram: str  # (C, C) Gram of the samples, or (N, C) sums of their squares when ``diagonal``
    gram_sum: str  # (N, C) sums of the samples
    diagonal: bool
    index: Optional[str]  # the input of the k sampled positions (None: every pixel)
    k: int
    pixels: int

    def outputs(self) -> List[str]:
        return [o for o in (self.sums, self.abs_sums, self.gram, self.gram_sum) if o is not None]


REDUCE_IN_GRAPH_WORK = 2 ** 25  # Gram multiply-adds plus map elements per batch that are reduced inside onnxruntime


class _StatsGraph:
    """The model set up for the statistics. A tensor whose statistics are little work (a Gram
    of few channels over a small map) is exposed as an output and reduced in NumPy
    (:meth:`TensorStats.add`). One with at least ``REDUCE_IN_GRAPH_WORK`` Gram multiply-adds
    and map elements per batch is reduced inside onnxruntime: per-image channel sums (and
    |x| sums), and the Gram matrix and sum of a sample of pixels, so that only (N, C) and
    (C, C) results leave the session, not the map. Measured over the whole calibration, in
    plain passes, with every tensor reduced in the graph: MobileNetV2 at 224x224 3.43x ->
    2.37x, ResNet-18 1.16x -> 1.06x, alexnet_mnist 1.93x -> 1.68x, but resnet20_fmnist
    2.73x -> 3.17x and fmnist_resnet 1.85x -> 2.15x, whose many narrow 28x28 maps cost a
    handful of small onnxruntime ops each, more than NumPy's work on them: hence the split.

    In the graph every image of a batch is sampled at the same ``k`` positions, drawn at
    random for each batch; sums are returned per image and added up here in float64, and a
    fixed-batch model gets a mask input that zeroes its padded images in the Gram. Tensors
    whose axis 0 is not the batch, or that are not float32, stay in NumPy."""

    def __init__(self, model: onnx.ModelProto, tensors: Dict[str, int], shapes, types: Dict[str, int], batch: int,
                 absolute: bool, fixed_batch: bool, in_graph: bool = True, batches: int = 1):
        """``shapes``, ``types``: each tensor's dims at ``batch`` and element type (static_shapes)."""
        from onnx import TensorProto, helper

        from .load import default_opset

        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        g = self.model.graph
        del g.output[:]
        opset = default_opset(model)
        self.plan: List[_Reduced] = []
        self.raw: List[str] = []  # tensors exposed whole
        prefix = "__onnxprune_stats"
        self.mask = prefix + "_mask" if fixed_batch else None

        def const(name, values):
            g.initializer.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
            return name

        def reduce(op, x, axes, out):
            if opset >= 18 or (op == "ReduceSum" and opset >= 13):
                g.node.append(helper.make_node(op, [x, const(out + "_axes", axes)], [out], keepdims=0))
            else:
                g.node.append(helper.make_node(op, [x], [out], axes=axes, keepdims=0))
            return out

        for i, (name, repeat) in enumerate(tensors.items()):
            shape = shapes.get(name)
            # axis 0 must be the batch (a MatMul input reshaped to (N x H x W, C) is not): the
            # mask and the per-image sums read it so
            known = (shape is not None and len(shape) >= 2 and all(d is not None for d in shape)
                     and shape[0] == batch)
            c = pixels = 0
            if known:
                c = int(shape[1]) // repeat if repeat > 1 else int(shape[1])
                pixels = repeat if repeat > 1 else int(np.prod(shape[2:], dtype=np.int64))
            cap = _gram_cap(c, batches)
            work = min(batch * pixels, cap) * c * c + batch * c * pixels
            # float32 only: the added nodes and their mask are float32
            if not (in_graph and known) or work < REDUCE_IN_GRAPH_WORK or types.get(name) != TensorProto.FLOAT:
                self.raw.append(name)
                g.output.append(helper.make_empty_tensor_value_info(name))
                continue
            t = f"{prefix}{i}"
            g.node.append(helper.make_node("Reshape", [name, const(t + "_shape", [0, c, pixels])], [t + "_x"]))
            sums = reduce("ReduceSum", t + "_x", [2], t + "_sums")
            abs_sums = reduce("ReduceL1", t + "_x", [2], t + "_abs") if absolute else None
            k = min(pixels, -(-cap // batch))
            x = t + "_x"
            index = None
            if k < pixels:
                index = t + "_at"
                g.input.append(helper.make_tensor_value_info(index, TensorProto.INT64, [k]))
                g.node.append(helper.make_node("Gather", [x, index], [t + "_picked"], axis=2))
                x = t + "_picked"
            # per image, so that the padded images are dropped and the batch is summed in float64
            # (a float32 sum over every sampled row lost digits where the mean is large)
            gsum = reduce("ReduceSum", x, [2], t + "_gsum")
            diagonal = c > FULL_GRAM_LIMIT
            if diagonal:  # the variances only, per image
                gram = reduce("ReduceSumSquare", x, [2], t + "_squares")
            else:
                if self.mask is not None:
                    g.node.append(helper.make_node("Mul", [x, self.mask], [t + "_masked"]))
                    x = t + "_masked"
                g.node.append(helper.make_node("Transpose", [x], [t + "_rows3"], perm=[0, 2, 1]))
                g.node.append(helper.make_node("Reshape", [t + "_rows3", const(t + "_flat", [-1, c])], [t + "_rows"]))
                gram = t + "_gram"
                g.node.append(helper.make_node("Gemm", [t + "_rows", t + "_rows"], [gram], transA=1))
            entry = _Reduced(name, sums, abs_sums, gram, gsum, diagonal, index, k, pixels)
            g.output.extend(helper.make_empty_tensor_value_info(o) for o in entry.outputs())
            self.plan.append(entry)
        if self.mask is not None and self.plan:
            g.input.append(helper.make_tensor_value_info(self.mask, TensorProto.FLOAT, ["n", 1, 1]))

    def feeds(self, batch_index: int, n: int, real: int) -> Dict[str, np.ndarray]:
        feeds = {}
        if self.mask is not None and self.plan:
            feeds[self.mask] = (np.arange(n) < real).astype(np.float32).reshape(n, 1, 1)
        for i, r in enumerate(self.plan):
            if r.index is not None:
                # random positions, new for every batch: an evenly spaced grid can fall on the same
                # few columns of every image (a stride that is a multiple of the width)
                rng = np.random.default_rng((batch_index, i))
                feeds[r.index] = np.sort(rng.choice(r.pixels, r.k, replace=False)).astype(np.int64)
        return feeds

    def outputs(self) -> List[str]:
        return self.raw + [o for r in self.plan for o in r.outputs()]


def collect_stats(model: onnx.ModelProto, tensors: Dict[str, int], cal: CalibrationSet, indices: Sequence[int],
                  providers: List[str], progress: Progress = silent, label: str = "calibrating",
                  absolute: bool = False, ours: bool = False) -> ChannelStats:
    """``tensors``: name -> positions per channel (1, or the pixels of a flattened map).
    ``absolute``: also the mean |x| of each channel. ``ours``: ``model`` is one onnxprune made
    (a pruned model), so onnxruntime's failures on it are internal errors."""
    from .shapes import static_shapes

    start = time.perf_counter()
    batches = -(-len(indices) // cal.batch_size)
    stats = ChannelStats(tensors={n: TensorStats(absolute=absolute, batches=batches) for n in tensors})
    if not tensors:
        return stats
    types: Dict[str, int] = {}
    shapes = static_shapes(model, {cal.spec.name: (cal.batch_size,) + cal.sample_shape}, types)
    # on the CPU provider only: measured there, and a GPU may run the added Gemm in TF32,
    # whose 10-bit mantissa the second moments were never checked against
    graph = _StatsGraph(model, tensors, shapes, types, cal.batch_size, absolute, bool(cal.spec.fixed_batch),
                        in_graph=providers[0] == "CPUExecutionProvider", batches=batches)
    sess = make_session(graph.model, providers, ours=ours)
    wanted = graph.outputs()
    raw = {n: tensors[n] for n in graph.raw}

    def accumulate(values: Dict[str, np.ndarray], real: int, batch: int) -> None:
        _add_maps(stats, raw, [values[n] for n in graph.raw], real, batch)
        _add_reduced(stats, graph, values, real)

    # the in-graph reductions sum over the batch: a padded image would count in them
    steady = min(cal.batch_size, len(indices)) if keeps_shapes(sess) and not graph.plan else 0
    # a batch's statistics are taken while onnxruntime runs the next one
    with progress(label, len(indices)) as update, blas_single_thread(), Overlapped() as behind:
        for b, batch in enumerate(cal.batches(indices)):
            real = cal.real_count(b, indices)
            batch = pad_batch(batch, steady)
            feeds = dict(graph.feeds(b, len(batch), real), **{cal.spec.name: batch})
            values = dict(zip(wanted, run_feeds(sess, feeds, wanted, len(batch))))
            behind.submit(accumulate, values, real, len(batch))
            stats.images += real
            update(real)
    stats.seconds = time.perf_counter() - start
    return stats


def _nan_error(where: str) -> InputError:
    return InputError(f"the model computes NaN or infinite values at {where!r} on the calibration data")


def _add_maps(stats: ChannelStats, tensors: Dict[str, int], outs, real: int, batch: int) -> None:
    for name, value in zip(tensors, outs):
        rows = len(value)
        # the rows of the real images: all of a tensor whose axis 0 folds the batch with the pixels
        # (a MatMul input reshaped to (N x H x W, C), batch outermost), as far as the real images go
        x = value[:rows * real // batch] if rows != batch and rows % batch == 0 else value[:real]
        if tensors[name] > 1:
            x = x.reshape(x.shape[0], -1, tensors[name])
        with np.errstate(over="ignore", invalid="ignore"):  # reported below as one line, not as warnings
            stats.tensors[name].add(x)
        # a NaN or infinity anywhere carries into the running sums (no pass of its own)
        if not np.isfinite(stats.tensors[name].sum).all():
            raise _nan_error(name)


def _add_reduced(stats: ChannelStats, graph: _StatsGraph, values: Dict[str, np.ndarray], real: int) -> None:
    for r in graph.plan:
        sums = values[r.sums][:real].astype(np.float64)
        if not np.isfinite(sums).all():  # every pixel is in the per-image sums: no pass of its own
            raise _nan_error(r.name)
        gram = values[r.gram][:real].sum(axis=0, dtype=np.float64) if r.diagonal else values[r.gram].astype(np.float64)
        stats.tensors[r.name].add_reduced(sums, values[r.abs_sums][:real] if r.abs_sums else None, gram,
                                          values[r.gram_sum][:real].sum(axis=0, dtype=np.float64), r.pixels,
                                          real * r.k)
