"""Least-squares refits of one layer against the original model's output.

Each solver streams, for the same images, the layer's input in the pruned
model and what the original model had there (its layer's output for
PatchFit, its layer's input for ChannelFit), accumulates float64 Gram
matrices, and solves for the pruned layer's weights and bias so that its
output matches the original layer's output on its kept channels:

- PatchFit: a dense Conv, exactly, over im2col patches of the pruned input
  (rows sampled per image when there are many, which the solve does not need);
  against a residual sum less the pruned skip tensor where the conv ends a
  residual block, and with a few steps on the error after a Relu that follows;
- ChannelFit: any layer that sums over channels (a Conv of many channels, a
  fully connected layer, one behind a Flatten viewed per channel): regress
  the original input's channels on the pruned input's, pixel by pixel, and
  fold the regression into the original weights. Exact for 1x1 convs and
  fully connected layers.

The ridge is relative to the mean diagonal of the Gram matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import scipy.linalg

from .runtime import blas_threads_for

# Widest im2col row (kept in-channels x kernel taps) fitted exactly; wider layers get the
# channel-level fit. Chosen by measurement (bench/results/2026-11-22-patch-limit.md): on
# vggwide_fmnist's convs 1350-2304 wide the exact fit cut the held-out error by 1-7%, with
# no accuracy change beyond noise, at 1.5-3.8x the refit's time, and ResNet-18 at 224x224
# converted fastest at this limit (9.5 s at -50%, 11.1 s at 2304, 9.9 s at 600, where channel
# fits on large maps cost more than the patch fits they replace). Up to 1200 the exact fit
# wins on held-out error (by up to 17% on alexnet_mnist's 721-865 wide convs).
PATCH_LIMIT = 1200
# Patch rows sampled per unknown of a layer's system, over all calibration images together:
# enough for a well-determined least-squares fit, far fewer than all pixels of large maps.
ROWS_PER_UNKNOWN = 16
# ... and at least this many rows in all (as far as the images have positions): a narrow
# layer's system (a 3x3 conv reading 8-16 channels has 73-145 unknowns) is as cheap to build
# from 4096 rows as from 1200-2300, and its fit less noisy. On the benchmark models, at
# -30/-50/-70%: fmnist_resnet 0.90/1.12/3.07 -> 0.82/1.03/2.96 points lost, resnet20_fmnist at
# -70% 3.31 -> 2.81, the others within 0.05; MobileNetV2's refit at 224x224 +5%.
MIN_ROWS = 4096


def _ridge(gram: np.ndarray, ridge: float) -> Optional[np.ndarray]:
    """The ridge added to each unknown of a system with ``gram`` (its last unknown the
    intercept, which is not shrunk), or None where the Gram matrix has no scale."""
    d = np.diag(gram)[:-1]
    scale = float(d.mean()) if len(d) else 1.0
    if not np.isfinite(scale) or scale <= 0:
        return None
    reg = np.full(len(gram), ridge * scale)
    reg[-1] = 1e-9 * scale
    return reg


def _factor(gram: np.ndarray, reg: np.ndarray):
    """The Cholesky factor of ``gram`` with the ridge ``reg`` (:func:`_ridge`) added, or None
    where it has none."""
    try:
        return scipy.linalg.cho_factor(gram + np.diag(reg))
    except (np.linalg.LinAlgError, ValueError):
        return None


def _solve_with(factor, rhs: np.ndarray) -> Optional[np.ndarray]:
    sol = scipy.linalg.cho_solve(factor, rhs)
    return sol if np.isfinite(sol).all() else None


def _solve_toward(gram: np.ndarray, rhs: np.ndarray, ridge: float, prior: Optional[np.ndarray]):
    """Ridge least squares from the normal equations, (G + R) theta = rhs + R theta_0: the
    ridge pulls the solution toward ``prior`` (theta_0; zero where None). An ill-conditioned
    system (dead or duplicate channels) is what the ridge is for. Returns the factor and the
    right-hand side used (the ReLU steps solve again with both), and the solution, or Nones."""
    reg = _ridge(gram, ridge)
    factor = None if reg is None else _factor(gram, reg)
    if factor is None:
        return None, None, None
    if prior is not None:
        rhs = rhs + reg[:, None] * prior
    return factor, rhs, _solve_with(factor, rhs)


BLOCK_ELEMENTS = 2 ** 22  # weights are taken to float64 this many elements at a time


def output_blocks(f: np.ndarray):
    """Slices of the outputs (axis 1) of (C, out, taps) filters, about BLOCK_ELEMENTS each."""
    step = max(1, BLOCK_ELEMENTS // max(1, f.shape[0] * int(np.prod(f.shape[2:]))))
    for start in range(0, f.shape[1], step):
        yield slice(start, min(f.shape[1], start + step))


def _combine(theta: np.ndarray, f: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """New filters sum_c theta[k, c] f[c] (in f's dtype, computed in float64) and the bias
    b + sum_c theta[-1, c] f[c], over blocks of outputs: no float64 copy of all of f.

    When f is a view whose outputs are outermost in memory (a fully connected layer's
    (out, in) weight seen per input channel), the result is laid out the same way, so the
    layer's weight comes back out of it without a transposing copy."""
    c = f.shape[0]
    dtype = np.result_type(f.dtype, np.float32)
    shape = (theta.shape[0] - 1,) + f.shape[1:]
    outputs_major = f.ndim == 3 and f.strides[1] > f.strides[0]
    if outputs_major:
        new_f = np.empty((shape[1], shape[0], shape[2]), dtype=dtype).transpose(1, 0, 2)
    else:
        new_f = np.empty(shape, dtype=dtype)
    new_b = np.array(b, dtype=np.float64)
    for block_slice in output_blocks(f):
        start, stop = block_slice.start, block_slice.stop
        if outputs_major:  # (outputs, C, taps), contiguous
            block = np.ascontiguousarray(f[:, start:stop].transpose(1, 0, 2), dtype=np.float64)
            new_f[:, start:stop] = np.matmul(theta[:-1], block).transpose(1, 0, 2)
            new_b[start:stop] += np.matmul(theta[-1], block).sum(axis=-1)
        else:
            block = np.ascontiguousarray(f[:, start:stop], dtype=np.float64)
            flat = block.reshape(c, -1)
            new_f[:, start:stop] = (theta[:-1] @ flat).reshape((-1,) + block.shape[1:])
            new_b[start:stop] += (theta[-1] @ flat).reshape(block.shape[1:]).sum(axis=-1)
    return new_f, new_b


def _with_ones(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1), dtype=x.dtype)])


def conv_pads(attrs: dict, in_hw, kernel, strides, dilations):
    pads = list(attrs.get("pads", [0] * 4))
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 4
        for i in range(2):
            out = -(-in_hw[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_hw[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 4
    return pads


def _padded(x: np.ndarray, pads) -> np.ndarray:
    """``x`` with its spatial padding, or ``x`` itself where there is none (1x1 convs): padding
    copies the whole batch, which for a few sampled positions cost more than the sampling."""
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """(N, C, H, W) -> (N * H' * W', C * kh * kw), columns ordered like a Conv weight's."""
    n, c, h, w = x.shape
    xp = _padded(x, pads)
    ho = (h + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    wo = (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    cols = np.empty((n, ho, wo, c, kernel[0], kernel[1]), dtype=x.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            r, s = i * dilations[0], j * dilations[1]
            cols[:, :, :, :, i, j] = xp[:, :, r:r + strides[0] * ho:strides[0], s:s + strides[1] * wo:strides[1]].transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kernel[0] * kernel[1])


def gather_patches(x: np.ndarray, kernel, strides, pads, dilations, pos: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    wo = (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    oy, ox = (pos // wo) * strides[0], (pos % wo) * strides[1]  # (n, per_image), in padded coordinates
    ky = np.arange(kernel[0]) * dilations[0]
    kx = np.arange(kernel[1]) * dilations[1]
    rows = oy[:, :, None, None] + ky[None, None, :, None] - pads[0]  # (n, p, kh, 1), in x
    cols = ox[:, :, None, None] + kx[None, None, None, :] - pads[1]  # (n, p, 1, kw)
    batch = np.arange(n)[:, None, None, None]
    # taken from x itself, taps in the padding set to zero: padding a copy of the whole batch
    # cost more than gathering the few sampled positions
    patches = x.transpose(0, 2, 3, 1)[batch, np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)]  # (n, p, kh, kw, c)
    outside = (rows < 0) | (rows >= h) | (cols < 0) | (cols >= w)
    if outside.any():
        patches[np.broadcast_to(outside, patches.shape[:4])] = 0
    return patches.transpose(0, 1, 4, 2, 3).reshape(n * pos.shape[1], c * kernel[0] * kernel[1])


class PatchFit:
    """Exact refit of a dense 2-D Conv: new weights over the pruned input's patches, against
    the original layer's output at the same positions.

    The rows to fit against come from one pass of the original model over all layers
    (:meth:`positions`, :meth:`rows`), and are handed to :meth:`add` with the pruned
    layer's input when the refit reaches the layer."""

    def __init__(self, kernel, attrs: dict, keep_in: np.ndarray, keep_out: np.ndarray, rows_per_image: int,
                 seed: int = 0, relu_steps: int = 0, prior=None):
        """``relu_steps``: the layer's output (or its sum with a skip tensor, see :meth:`add`) goes
        into a Relu, and the fit takes this many majorize-minimize steps on the error after it.
        ``prior``: the original layer's (weight, bias or None), all channels, which the ridge
        shrinks the fit toward (sliced to the kept ones) rather than toward zero, so that a
        layer whose slicing is already exact stays exact; held by reference, read at the solve."""
        self.kernel = list(kernel)
        self.attrs = attrs
        self.strides = list(attrs.get("strides", [1, 1]))
        self.dilations = list(attrs.get("dilations", [1, 1]))
        self.rows_per_image = rows_per_image
        self.rng = np.random.default_rng(seed)
        self.keep_in = keep_in
        self.keep_out = np.flatnonzero(keep_out)
        self.gram = self.rhs = None  # made at the first batch: a fit waits for its turn holding nothing
        self.relu_steps = relu_steps
        self.kept: list = []  # (rows, the original pre-activation, skip) per batch, for the ReLU steps
        self.prior = prior

    def positions(self, images: int, positions: int) -> Optional[np.ndarray]:
        """The output positions to fit at, ``rows_per_image`` random ones of each image's
        ``positions`` as (images, rows_per_image), or None for all of them where there are no
        more; drawn image after image from this fit's own generator."""
        if self.rows_per_image >= positions:
            return None
        return np.stack([np.sort(self.rng.choice(positions, self.rows_per_image, replace=False)) for _ in range(images)])

    def rows(self, y: np.ndarray) -> np.ndarray:
        """The rows to fit against from the original layer's output at the positions, (N, out,
        positions): its kept outputs, as float32 (N, positions, kept) in im2col's order."""
        return np.ascontiguousarray(y.transpose(0, 2, 1)[:, :, self.keep_out], dtype=np.float32)

    def targets(self, y: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """:meth:`rows` and :meth:`positions` taken from the original layer's whole output ``y``
        (N, out, Ho, Wo)."""
        y3 = y.reshape(y.shape[0], y.shape[1], -1)
        pos = self.positions(len(y3), y3.shape[2])
        if pos is not None:
            y3 = np.take_along_axis(y3, pos[:, None, :], axis=2)
        return self.rows(y3), pos

    @staticmethod
    def skip_rows(skip: np.ndarray, pos: Optional[np.ndarray]) -> np.ndarray:
        """The rows of a pruned model's tensor of the layer's output shape (N, kept, Ho, Wo) at
        the :meth:`positions` ``pos``, laid out as :meth:`rows`."""
        s3 = skip.reshape(skip.shape[0], skip.shape[1], -1)
        if pos is not None:
            s3 = np.take_along_axis(s3, pos[:, None, :], axis=2)
        return np.ascontiguousarray(s3.transpose(0, 2, 1), dtype=np.float32)

    def add(self, rows: np.ndarray, pos: Optional[np.ndarray], x_new: np.ndarray,
            skip: Optional[np.ndarray] = None) -> None:
        """``rows``: :meth:`rows` of the original layer's output at the :meth:`positions`
        ``pos``; ``x_new``: the pruned layer's input, for the same images. ``skip``: where the
        layer's output is added to another tensor (a residual block's last conv and its skip
        connection), ``rows`` are the original sum's and ``skip`` the pruned model's other
        tensor at the same rows: the layer is fitted to what the sum needs from it, so that it
        also makes up for the error the skip path carries, which no layer there can."""
        pads = conv_pads(self.attrs, x_new.shape[2:], self.kernel, self.strides, self.dilations)
        geometry = (self.kernel, self.strides, pads, self.dilations)
        p_new = im2col(x_new, *geometry) if pos is None else gather_patches(x_new, *geometry, pos)
        target = rows.reshape(-1, rows.shape[-1])
        skip = None if skip is None else np.asarray(skip, dtype=np.float32).reshape(target.shape)
        if skip is not None:
            target = target - skip
        # one batch's products in float32 (BLAS speed), accumulated across batches in float64
        a = _with_ones(np.ascontiguousarray(p_new, dtype=np.float32))
        count, d = a.shape
        if self.gram is None:
            self.gram = np.zeros((d, d))
            self.rhs = np.zeros((d, target.shape[1]))
        with blas_threads_for(count * (d * d / 2 + d * target.shape[1])):
            self.gram += a.T @ a
            self.rhs += a.T @ target
        if self.relu_steps:
            target = np.asarray(target, dtype=np.float32)
            # what the Relu sees in the original (the sum, where there is a skip): the same at every step
            self.kept.append((a, target if skip is None else target + skip, skip))

    def solve(self, ridge: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        if self.gram is None:
            return None
        # the ridge pulls toward the sliced original weights
        factor, rhs, sol = _solve_toward(self.gram, self.rhs, ridge,
                                         self._prior_theta() if self.prior is not None else None)
        if sol is not None and self.kept:
            sol = self._relu_steps(sol, factor, rhs)
        self.kept = []
        if sol is None:
            return None
        k = int(self.keep_in.sum())
        return sol[:-1].T.reshape((len(self.keep_out), k) + tuple(self.kernel)), sol[-1]

    def _prior_theta(self) -> np.ndarray:
        """The original layer's weights on the kept inputs and outputs, in the solution's layout
        (im2col columns x kept outputs, the bias last)."""
        weight, bias = self.prior
        w = np.asarray(weight)[self.keep_out][:, self.keep_in]
        theta = np.empty((w[0].size + 1, len(self.keep_out)))
        theta[:-1] = w.reshape(len(self.keep_out), -1).T
        theta[-1] = 0.0 if bias is None else np.asarray(bias)[self.keep_out]
        return theta

    def _relu_steps(self, sol: np.ndarray, factor, rhs: np.ndarray) -> np.ndarray:
        """Least squares on the pre-activation charges errors that the Relu after the layer
        erases: wherever the original pre-activation y is negative, any prediction u below zero
        gives the same output. Majorize-minimize on |relu(u) - relu(y)|^2: each step sets the
        target of those entries to min(u, 0) at the current solution, which bounds that error
        from above and equals it there, and solves again; so no step makes the post-Relu error
        on the fitted rows larger (the ridge aside). Only the right-hand side changes: the
        Gram matrix is factorized once."""
        rows = sum(len(a) for a, _, _ in self.kept)
        for _ in range(self.relu_steps):
            shift = np.zeros_like(self.rhs)  # A^T (new target - target)
            with blas_threads_for(2 * rows * len(sol) * sol.shape[1]):
                w = sol.astype(np.float32)
                for a, y, skip in self.kept:
                    u = a @ w  # the layer's output; the Relu sees u + skip against y
                    if skip is not None:
                        u += skip
                    shift += a.T @ np.where(y > 0, 0.0, np.minimum(u, 0.0) - y)
            step = _solve_with(factor, rhs + shift)
            if step is None:
                break
            sol = step
        return sol


class ChannelFit:
    """Refit by regressing the original input's channels on the pruned input's, per pixel.

    ``filters`` are the original layer's per-input-channel weights on its kept
    outputs, (C, out, taps); the result is the same layout over the kept inputs.
    ``repeat`` > 1 views a flattened (N, C * repeat) input as (N, C, repeat).
    """

    def __init__(self, filters: np.ndarray, bias: np.ndarray, repeat: int = 1, keep_in: Optional[np.ndarray] = None):
        self.f = filters  # in the layer's own dtype: a float64 copy would double a large layer
        self.b = bias.astype(np.float64)
        self.repeat = repeat
        self.keep_in = keep_in  # which original channels the pruned input's channels are
        self.gram = None
        self.cross = None
        self.rows = 0

    def _pixels(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape(x.shape[0], -1, self.repeat) if self.repeat > 1 else x.reshape(x.shape[0], x.shape[1], -1)
        return np.moveaxis(x, 1, 2).reshape(-1, x.shape[1]).astype(np.float64)

    def add(self, x_orig: np.ndarray, x_new: np.ndarray) -> None:
        a = _with_ones(self._pixels(x_new))
        t = self._pixels(x_orig)
        if self.gram is None:
            self.gram = np.zeros((a.shape[1], a.shape[1]))
            self.cross = np.zeros((a.shape[1], t.shape[1]))
        self.gram += a.T @ a
        self.cross += a.T @ t
        self.rows += a.shape[0]

    def _kept(self) -> np.ndarray:
        """The original channels kept, in the pruned input's order."""
        k = self.gram.shape[0] - 1
        return np.flatnonzero(self.keep_in if self.keep_in is not None else np.arange(self.cross.shape[1]) < k)

    def _selection(self) -> np.ndarray:
        """Each kept channel standing for itself and each removed one for nothing: the layer
        merely sliced, in the regression's layout (kept channels x original ones, intercept last)."""
        kept = self._kept()
        theta = np.zeros((len(kept) + 1, self.cross.shape[1]))
        theta[np.arange(len(kept)), kept] = 1.0
        return theta

    def _means_only(self) -> np.ndarray:
        """Each kept channel stands for itself, shifted to its original mean; each removed one
        for its mean. Used when there are too few samples for a regression."""
        mean_new = self.gram[-1, :-1] / self.rows
        theta = self._selection()
        theta[-1] = self.cross[-1] / self.rows
        theta[-1, self._kept()] -= mean_new
        return theta

    def solve(self, ridge: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        if self.gram is None:  # no images
            return None
        if 8 * self.rows < self.gram.shape[0]:
            theta = self._means_only()  # far fewer samples than unknowns: a regression would be noise
        else:
            # x_orig ~ [x_new, 1] theta, the ridge pulling toward the merely sliced layer, so that
            # a layer whose input the pruning left as it was stays as it was
            theta = _solve_toward(self.gram, self.cross, ridge, self._selection())[2]
        if theta is None:
            return None
        return _combine(theta, self.f, self.b)
