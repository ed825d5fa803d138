"""IDX file reader and the Fashion-MNIST loader.

Fashion-MNIST is searched in ``root``, then the Debian package directory
``/usr/share/datasets/fashion-mnist/`` (``sudo apt-get install
dataset-fashion-mnist``), then ``<cache_dir>/fashion-mnist/`` (an earlier
download), and finally downloaded from the canonical Zalando mirror when a
network is reachable. Every file is verified: the SHA-256 of its *decompressed*
IDX bytes must match the pinned constants. (The Debian ``.gz`` files differ from
the upstream ones only in the gzip header, which omits the original file name;
their payloads are identical, so one pin covers both.)

Example:
    >>> ds = load_dataset("fashion_mnist", max_train=1000)   # doctest: +SKIP
    >>> ds.x_train.shape, ds.x_test.shape                    # doctest: +SKIP
    ((1000, 1, 28, 28), (10000, 1, 28, 28))
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.datasets import DataUnavailableError, Dataset, image_dataset, subsample

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 10.0
LICENSE = "MIT (Zalando Research, Fashion-MNIST)"

#: SHA-256 of the decompressed IDX bytes of the official files (computed from the
#: Debian dataset-fashion-mnist files; upstream publishes the MD5 of the .gz files:
#: 8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...).
RAW_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes) -> np.ndarray:
    """Parse the bytes of an IDX file (magic ``00 00 <type> <ndim>``, big-endian dims).

    Raises:
        ValueError: If the header is malformed or the payload size is wrong.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file (bad magic number)")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"IDX payload size does not match dims {dims}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_bytes(path: str | os.PathLike[str]) -> bytes:
    """Raw IDX bytes of ``path``, gunzipped when it ends in ``.gz``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array.

    Example:
        >>> path = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
        >>> read_idx(path).shape   # doctest: +SKIP
        (10000,)
    """
    try:
        return parse_idx(read_idx_bytes(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _find(directory: Path, stem: str) -> Path | None:
    for cand in (directory / f"{stem}.gz", directory / stem):
        if cand.is_file():
            return cand
    return None


def _read_verified(path: Path, stem: str) -> np.ndarray:
    data = read_idx_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != RAW_SHA256[stem]:
        raise ValueError(
            f"{path} is not the official Fashion-MNIST file {stem} (sha256 of its "
            f"content {digest[:12]}... != {RAW_SHA256[stem][:12]}...); replace it"
        )
    return parse_idx(data)


def _download(cache: Path) -> Path:
    """Fetch the four .gz files into ``cache`` (verified); return ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    for stem in RAW_SHA256:
        target = cache / f"{stem}.gz"
        if target.is_file():
            continue
        part = cache / f"{stem}.{os.getpid()}.part.gz"
        with urllib.request.urlopen(BASE_URL + target.name, timeout=DOWNLOAD_TIMEOUT_S) as r:
            part.write_bytes(r.read())
        try:
            _read_verified(part, stem)
        except (ValueError, OSError):
            part.unlink(missing_ok=True)
            raise
        part.replace(target)
    return cache


def _locate(root: str | None, cache: Path, download: bool) -> Path:
    """First directory holding all four files, downloading if allowed."""
    dirs = ([Path(root).expanduser()] if root else []) + [DEBIAN_DIR, cache]
    for d in dirs:
        if all(_find(d, stem) for stem in RAW_SHA256):
            return d
    reason = "downloading is disabled (download=False)"
    if download:
        try:
            return _download(cache)
        except (OSError, ValueError) as exc:   # URLError is an OSError
            reason = f"download from {BASE_URL} failed: {exc}"
    raise DataUnavailableError(
        "Fashion-MNIST not found in " + ", ".join(str(d) for d in dirs) + f"; {reason}. "
        "Install it with `sudo apt-get install dataset-fashion-mnist`, or set `data.root` "
        "(root=...) to a directory holding train-images-idx3-ubyte(.gz), "
        "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)."
    )


def load_fashion_mnist(*, name: str = "fashion_mnist", root: str | None = None,
                       cache_dir: Path, seed: int = 0, max_train: int | None = None,
                       max_test: int | None = None, download: bool = True,
                       **_: Any) -> Dataset:
    """Load Fashion-MNIST (60k train, official 10k test; 1x28x28, 10 classes).

    ``test_fraction`` is ignored: the official test split is used.

    Args:
        name: Registry name.
        root: Directory with the four IDX files, searched first.
        cache_dir: Base cache directory (downloads go to ``fashion-mnist/`` in it).
        seed: Seed of the ``max_train`` / ``max_test`` subsampling.
        max_train: Keep this many train samples (stratified, deterministic).
        max_test: Keep this many test samples.
        download: Allow fetching from the canonical mirror.

    Returns:
        The data set (``source`` is the directory read).
    """
    d = _locate(root, Path(cache_dir) / "fashion-mnist", download)
    arrays = {stem: _read_verified(path, stem)
              for stem in RAW_SHA256 if (path := _find(d, stem)) is not None}
    xtr, ytr = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    xte, yte = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    ktr, kte = subsample(ytr, max_train, seed), subsample(yte, max_test, seed + 1)
    return image_dataset(name, (xtr[ktr], xte[kte]), (ytr[ktr], yte[kte]), (1, 28, 28),
                         255.0, 10, str(d), LICENSE)
