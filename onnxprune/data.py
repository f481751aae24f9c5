"""Calibration data: image folders and preprocessed tensor files, served in batches.

Images are decoded per batch. The conversion reads the fitting images at least twice
(calibration, then the refit's pass of the original model), so each image's decoded,
cropped pixels are kept, in their 8-bit form, up to ``DECODED_CACHE_BYTES`` in all:
beyond that an image is decoded again each time, so memory stays bounded by the batch
and that constant, not by the number of images.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError, UsageError
from .options import PruneOptions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL modes with one channel (+ alpha)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # how PIL opens 16-bit PNGs
# Decoding and resizing a 500x375 JPEG to 224x224 takes about 1.8 ms, a quarter of a plain
# ResNet-18 pass per image on 2 cores and three quarters of a MobileNetV2 one; 64 MiB holds
# 445 such images (8-bit RGB, a quarter of their float32 size), or 85,000 28x28 grey ones.
DECODED_CACHE_BYTES = 64 << 20


@dataclass
class InputSpec:
    """What the model's image input looks like."""

    name: str
    shape: Tuple[Optional[int], ...]  # as declared; None for dynamic axes
    channels_last: bool
    dtype: np.dtype

    @property
    def channels(self) -> Optional[int]:
        return self.shape[-1] if self.channels_last else self.shape[1]

    @property
    def spatial(self) -> Tuple[Optional[int], Optional[int]]:
        return tuple(self.shape[1:3]) if self.channels_last else tuple(self.shape[2:4])

    @property
    def fixed_batch(self) -> Optional[int]:
        return self.shape[0]


def _npz_key(keys: List[str]) -> str:
    """The calibration array of an .npz: 'x', else the first."""
    return "x" if "x" in keys else keys[0]


def _array_shape(calib) -> Optional[Tuple[int, ...]]:
    """The shape of calibration tensors given as an array, a .npy or an .npz (read from the
    file's header, not its data); None for a folder or anything unreadable."""
    if isinstance(calib, np.ndarray):
        return calib.shape
    if not isinstance(calib, (str, os.PathLike)):
        return None
    path = os.fspath(calib)
    try:
        if path.lower().endswith(".npy"):
            return np.load(path, mmap_mode="r", allow_pickle=False).shape
        if path.lower().endswith(".npz"):
            import zipfile
            with zipfile.ZipFile(path) as z:
                names = [n[:-len(".npy")] for n in z.namelist() if n.endswith(".npy")]
                if not names:
                    return None
                with z.open(_npz_key(names) + ".npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    return read(f)[0]
    except Exception:  # load_calibration says what is wrong with the file
        return None
    return None


def input_spec(model, opts: PruneOptions, calib=None) -> InputSpec:
    """The model's image input. Dynamic spatial axes take --input-size, or the size of the
    calibration tensors where ``calib`` is an array or an .npy/.npz file."""
    from onnx import helper

    from .prepare import data_inputs

    inputs = data_inputs(model.graph)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise InputError(f"the model has {len(inputs)} inputs ({names}); only single-input image models are supported")
    vi = inputs[0]
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    if len(dims) != 4:
        raise InputError(f"input {vi.name!r} has rank {len(dims)}; expected an image batch (N, C, H, W)")
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except Exception:
        dtype = np.dtype(np.float32)
    channels_last = dims[1] not in (1, 3) and dims[3] in (1, 3)
    spec = InputSpec(vi.name, dims, channels_last, dtype)
    h, w = spec.spatial
    size, source = (tuple(opts.input_size), "--input-size") if opts.input_size is not None else (None, "")
    if size is not None and h is not None and w is not None and size != (h, w):
        raise UsageError(f"--input-size {size[0]},{size[1]}: input {vi.name!r} has a fixed "
                         f"size {h}x{w}; --input-size is for models whose spatial axes are dynamic")
    if h is None or w is None:
        shape = _array_shape(calib) if size is None else None
        if shape is not None and len(shape) in (3, 4):
            sample = shape[-3:]
            size = tuple(int(d) for d in (sample[0:2] if channels_last else sample[1:3]))
            source = "the calibration array"
        if size is None:
            raise UsageError(f"the spatial axes of input {vi.name!r} are dynamic: give --input-size H,W")
        for axis, fixed, given in (("height", h, size[0]), ("width", w, size[1])):
            if fixed is not None and fixed != given:
                raise UsageError(f"{source} gives {axis} {given}, but input {vi.name!r} has a fixed {axis} of {fixed}")
        h, w = size
        dims = (dims[0], h, w, dims[3]) if channels_last else (dims[0], dims[1], h, w)
        spec = InputSpec(vi.name, dims, channels_last, dtype)
    if spec.channels is None:
        raise InputError(f"the channel axis of input {vi.name!r} is dynamic; cannot tell grey from colour")
    return spec


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` with its last row repeated up to ``size`` rows: a fixed-batch model takes exactly
    its batch, and the results of the padding are dropped."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


FINITE_CHUNK = 64  # samples checked for NaN at a time: no mask the size of the whole array


@dataclass
class CalibrationSet:
    """The calibration items, split into a scoring part and a held-out part."""

    spec: InputSpec
    opts: PruneOptions
    files: Optional[List[str]] = None
    array: Optional[np.ndarray] = None
    skipped: int = 0  # non-image files in the folder
    fit: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    notes: List[str] = field(default_factory=list)  # conversions made, one line each, for the report
    labels: Optional[np.ndarray] = None  # class id per item, with --labels
    rows: Optional[np.ndarray] = None  # the rows of ``array`` used (None: all of them)
    # files index -> decoded pixels (H, W, C) before scaling, within DECODED_CACHE_BYTES
    decoded: dict = field(default_factory=dict, repr=False)
    decoded_bytes: int = 0

    def __len__(self) -> int:
        if self.files is not None:
            return len(self.files)
        return len(self.rows) if self.rows is not None else len(self.array)

    @property
    def batch_size(self) -> int:
        fixed = self.spec.fixed_batch
        return fixed if fixed else self.opts.batch_size

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.spec.shape[1:])

    def batches(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        bs = self.batch_size
        indices = np.asarray(indices)
        for start in range(0, len(indices), bs):
            chunk = indices[start:start + bs]
            if self.spec.fixed_batch:
                chunk = pad_batch(chunk, bs)
            yield self._load(chunk)

    def first_sample(self) -> np.ndarray:
        """One preprocessed input without its batch axis (the first fitting one, else held out)."""
        return next(self.batches(self.fit[:1] if len(self.fit) else self.holdout[:1]))[0]

    def real_count(self, batch_index: int, indices: Sequence[int]) -> int:
        bs = self.batch_size
        return min(bs, len(indices) - batch_index * bs)

    def _load(self, chunk: np.ndarray) -> np.ndarray:
        if self.array is not None:
            rows = self.rows[chunk] if self.rows is not None else chunk
            return np.ascontiguousarray(self.array[rows], dtype=self.spec.dtype)
        return np.stack([self._image(int(i)) for i in chunk]).astype(self.spec.dtype, copy=False)

    def _image(self, index: int) -> np.ndarray:
        pixels = self.decoded.get(index)
        if pixels is None:
            pixels = self._decode(self.files[index])
            if self.decoded_bytes + pixels.nbytes <= DECODED_CACHE_BYTES:
                self.decoded[index] = pixels
                self.decoded_bytes += pixels.nbytes
        spec, opts = self.spec, self.opts
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], spec.channels, axis=2)
        if opts.bgr and pixels.shape[2] == 3:
            pixels = pixels[:, :, ::-1]
        x = pixels.astype(np.float32) * np.float32(opts.scale)
        x = (x - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32)
        return x if spec.channels_last else np.transpose(x, (2, 0, 1))

    def _decode(self, path: str) -> np.ndarray:
        """The image at ``path`` converted, resized and cropped to the input: uint8 (H, W) or
        (H, W, 3), or float32 (H, W) on the 8-bit scale for 16-bit images."""
        from PIL import Image

        spec = self.spec
        h, w = (int(d) for d in spec.spatial)
        try:
            with Image.open(path) as img, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's note on palette transparency: the report says it
                if img.mode in SIXTEEN_BIT_MODES:
                    # to the 8-bit scale that --scale and --mean assume (65535 -> 255), as floats:
                    # PIL's own conversion to 8 bits clips every value above 255
                    img = Image.fromarray(np.asarray(img, dtype=np.float32) / np.float32(257.0), mode="F")
                else:
                    img = img.convert("L" if spec.channels == 1 else "RGB")
                scale = max(h / img.height, w / img.width)
                size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
                if size != img.size:
                    img = img.resize(size, Image.BILINEAR)
                left, top = (size[0] - w) // 2, (size[1] - h) // 2
                img = img.crop((left, top, left + w, top + h))
                return np.array(img)
        except Exception as e:
            raise InputError(f"cannot decode image {path!r}: {e}") from e


def _list_images(folder: str) -> Tuple[List[str], int]:
    found, skipped = [], 0
    for root, dirs, files in os.walk(folder):
        # hidden files and folders (.DS_Store, macOS's ._name resource forks, .git) are not
        # calibration images, whatever their extension
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append(os.path.join(root, f))
            else:
                skipped += 1
    return sorted(found), skipped


def _check_headers(files: List[str], spec: InputSpec) -> List[str]:
    """Fail before any work on a file that is not an image (reads headers only), and say
    which conversions the images will need: one line per kind, with how many."""
    from PIL import Image

    h, w = (int(d) for d in spec.spatial)
    to_rgb = to_grey = alpha = smaller = wide = 0
    for path in files:
        try:
            with Image.open(path) as img:
                mode, (width, height) = img.mode, img.size
                wide += mode in SIXTEEN_BIT_MODES
                transparent = "A" in img.getbands() or "transparency" in img.info
                grey = mode in GREY_MODES or (mode == "P" and _grey_palette(img.getpalette()))
        except Exception as e:
            raise InputError(f"cannot decode image {path!r}: {type(e).__name__}") from e
        if spec.channels == 3 and grey:
            to_rgb += 1
        elif spec.channels == 1 and not grey:
            to_grey += 1
        if transparent:
            alpha += 1
        if width < w or height < h:
            smaller += 1
    notes = []
    if wide:
        notes.append(f"read {wide} 16-bit calibration image{'s' * (wide != 1)} on the 8-bit scale "
                     "(value / 257) that --scale and --mean apply to")
    if to_rgb:
        notes.append(f"converted {to_rgb} grey calibration image{'s' * (to_rgb != 1)} to RGB "
                     "(the model takes 3 channels)")
    if to_grey:
        notes.append(f"converted {to_grey} colour calibration image{'s' * (to_grey != 1)} to grey "
                     "(the model takes 1 channel)")
    if alpha:
        notes.append(f"dropped the transparency of {alpha} calibration image{'s' * (alpha != 1)}")
    if smaller:
        notes.append(f"enlarged {smaller} calibration image{'s' * (smaller != 1)} smaller than the input "
                     f"{h}x{w} (resized up, then centre-cropped)")
    return notes


def _grey_palette(palette: Optional[List[int]]) -> bool:
    """Whether a palette (flat R, G, B values) holds only grey colours."""
    palette = palette or []
    rgb = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def _load_array(path: str) -> np.ndarray:
    """A .npy is mapped, not read: only the samples used (--max-images) are ever loaded, a
    batch at a time, however large the file. An .npz (a zip) is read whole."""
    try:
        if path.lower().endswith(".npy"):
            return np.load(path, mmap_mode="r", allow_pickle=False)
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = list(data.keys())
            if not keys:
                raise InputError(f"{path!r} holds no arrays")
            return data[_npz_key(keys)]  # read here: an object array fails only now
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read calibration tensors {path!r}: {e}") from e
    return data


def load_calibration(source: Union[str, os.PathLike, np.ndarray], spec: InputSpec, opts: PruneOptions) -> CalibrationSet:
    if isinstance(source, np.ndarray):
        cal = _from_array(source, spec, opts, "the calibration array")
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise InputError(f"calibration path {path!r} does not exist")
        if os.path.isdir(path):
            files, skipped = _list_images(path)
            if not files:
                raise InputError(f"calibration folder {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            if spec.channels not in (1, 3):
                raise InputError(f"input {spec.name!r} has {spec.channels} channels; images give 1 or 3: pass a .npy file")
            files = [files[i] for i in spread(len(files), opts.max_images)]
            notes = _check_headers(files, spec)
            cal = CalibrationSet(spec, opts, files=files, skipped=skipped, notes=notes)
            if opts.labels:
                cal.labels = _folder_labels(path, files)
        elif path.lower().endswith((".npy", ".npz")):
            cal = _from_array(_load_array(path), spec, opts, repr(path))
            if opts.labels:
                cal.labels = _array_labels(path, cal)
        else:
            raise InputError(f"calibration path {path!r} is neither a folder of images nor a .npy/.npz file")
    if cal.array is not None:
        _refuse_preprocessing(opts)
    _split(cal, opts)
    if not len(cal.fit):
        raise UsageError(f"--holdout {opts.holdout:g} leaves none of the {len(cal)} calibration images to score "
                         "and fit with; lower it or give more images")
    return cal


def _refuse_preprocessing(opts: PruneOptions) -> None:
    """Tensors are fed as they are: preprocessing options would be silently ignored."""
    default = type(opts)()
    given = [flag for flag, field in (("--mean", "mean"), ("--std", "std"), ("--scale", "scale"), ("--bgr", "bgr"))
             if getattr(opts, field) != getattr(default, field)]
    if given:
        raise UsageError(f"{', '.join(given)} preprocess images; calibration tensors (.npy/.npz or an array) are "
                         "fed to the model as they are: leave them out or give a folder of images")


def _folder_labels(folder: str, files: List[str]) -> np.ndarray:
    """Class subfolders, numbered in sorted order over all of them, as torchvision's
    ImageFolder does (not over those the --max-images picks happen to reach)."""
    tops = [os.path.relpath(f, folder).split(os.sep) for f in files]
    if any(len(t) < 2 for t in tops):
        raise InputError(f"--labels: {folder!r} must hold one subfolder per class, with the images inside")
    number = {name: i for i, name in enumerate(sorted(e.name for e in os.scandir(folder) if e.is_dir()))}
    return np.array([number[t[0]] for t in tops], dtype=np.int64)


def spread(n: int, limit: int) -> np.ndarray:
    """Which of ``n`` items (sorted files, array rows) to use when at most ``limit`` may be:
    evenly spaced over all of them, so that a folder or an array ordered by class is not
    cut down to its first classes."""
    if n <= limit:
        return np.arange(n)
    return (np.arange(limit) * n) // limit


def _array_labels(path: str, cal: CalibrationSet) -> np.ndarray:
    data = np.load(path, allow_pickle=False) if path.lower().endswith(".npz") else None
    if data is None or "y" not in data:
        raise InputError(f"--labels: {path!r} must be an .npz with an array 'y' of class ids beside 'x'")
    y = np.asarray(data["y"])
    if y.ndim != 1 or len(y) < len(cal.array) or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"--labels: 'y' in {path!r} must be one integer class id per sample")
    return (y[cal.rows] if cal.rows is not None else y[:len(cal.array)]).astype(np.int64)


def as_samples(array: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """``array`` as a batch of the model's input: as given when it is one; one sample given
    without its batch axis; or, for a single-channel input, images given without their
    channel axis ((N, H, W) for an (N, 1, H, W) input), as grey image arrays often come."""
    expected = tuple(int(d) for d in spec.shape[1:])
    given = tuple(array.shape)
    if given[1:] == expected:
        return array
    if given == expected:
        return array[None]
    if spec.channels == 1 and len(given) == len(expected):
        channel = len(expected) - 1 if spec.channels_last else 0
        if given[1:] == expected[:channel] + expected[channel + 1:]:
            return np.expand_dims(array, channel + 1)
    raise InputError(f"{what} has shape {given}; the model expects (N, {', '.join(map(str, expected))})")


def _from_array(array: np.ndarray, spec: InputSpec, opts: PruneOptions, what: str) -> CalibrationSet:
    array = as_samples(array, spec, what)
    if not np.issubdtype(array.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating):
        raise InputError(f"{what} has dtype {array.dtype}; expected preprocessed floating-point tensors")
    if len(array) == 0:
        raise InputError(f"{what} holds no samples")
    # the samples used are kept as row numbers: the array (maybe a memory map) is not copied,
    # and the rows not used are never read
    rows = spread(len(array), opts.max_images) if len(array) > opts.max_images else None
    used = rows if rows is not None else np.arange(len(array))
    if not all(np.isfinite(array[used[i:i + FINITE_CHUNK]]).all() for i in range(0, len(used), FINITE_CHUNK)):
        raise InputError(f"{what} contains NaN or infinite values")
    return CalibrationSet(spec, opts, array=array, rows=rows)


def _split(cal: CalibrationSet, opts: PruneOptions) -> None:
    """Hold out a seeded random share: folders sorted by class must not hold out one class."""
    n = len(cal)
    order = np.random.default_rng(opts.seed).permutation(n)
    n_hold = int(round(n * opts.holdout)) if n >= 5 else 0
    cal.holdout = np.sort(order[:n_hold])
    cal.fit = np.sort(order[n_hold:])
