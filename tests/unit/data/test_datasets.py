"""Tests of the Dataset container, the registry and the scikit-learn sets."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import Dataset, dataset_names, dataset_options, load_dataset
from fedsim.data.datasets import subsample


def test_registry_names_and_options():
    assert dataset_names() == ["breast_cancer", "digits", "fashion_mnist", "mnist5k",
                               "shakespeare", "wine"]
    assert dataset_options("digits") == {}
    assert dataset_options("fashion_mnist") == {"max_train": None, "max_test": None,
                                                "download": True}
    assert dataset_options("shakespeare")["seq_len"] == 80
    opts = dataset_options("shakespeare")
    opts["seq_len"] = 5  # a copy: the registry is not changed
    assert dataset_options("shakespeare")["seq_len"] == 80
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; choose one of"):
        dataset_options("cifar10")


def test_unknown_option_and_bad_test_fraction():
    with pytest.raises(ValueError, match=r"unknown options \['max_train'\]; accepted: none"):
        load_dataset("digits", max_train=10)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_dataset("wine", test_fraction=1.0)


@pytest.mark.parametrize("name,shape,kind,classes", [
    ("digits", (1, 8, 8), "image", 10),
    ("breast_cancer", (30,), "tabular", 2),
    ("wine", (13,), "tabular", 3),
])
def test_sklearn_sets(name, shape, kind, classes):
    ds = load_dataset(name, seed=0)
    n = len(ds.y_train) + len(ds.y_test)
    assert (ds.input_shape, ds.kind, ds.num_classes) == (shape, kind, classes)
    assert ds.x_train.shape[1:] == shape and ds.x_test.shape[1:] == shape
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert len(ds.y_test) == pytest.approx(0.2 * n, abs=1)
    assert ds.train_ids is None and "scikit-learn" in ds.source and ds.license
    axis = None if kind == "image" else 0   # images: one mean/std; tabular: per feature
    np.testing.assert_allclose(ds.x_train.mean(axis=axis), 0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(axis=axis), 1, atol=1e-3)
    # stratified: class proportions agree between train and test
    ptr = np.bincount(ds.y_train, minlength=classes) / len(ds.y_train)
    pte = np.bincount(ds.y_test, minlength=classes) / len(ds.y_test)
    assert np.abs(ptr - pte).max() < 0.05


def test_split_is_deterministic_in_seed():
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)
    assert len(load_dataset("digits", test_fraction=0.5).y_test) == 899


def test_test_set_uses_train_statistics():
    ds = load_dataset("breast_cancer", seed=0)
    assert abs(float(ds.x_test.mean())) > 1e-6  # not re-standardised on its own


def test_dataset_validates_lengths():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="lengths differ"):
        Dataset("t", x, np.zeros(2, np.int64), x, np.zeros(3, np.int64), 2, (2,), "tabular")
    with pytest.raises(ValueError, match="unknown kind"):
        Dataset("t", x, np.zeros(3, np.int64), x, np.zeros(3, np.int64), 2, (2,), "video")


def test_subsample():
    y = np.repeat(np.arange(4), 25)
    k = subsample(y, 20, seed=0)
    assert len(k) == 20 and np.all(np.diff(k) > 0)
    assert np.array_equal(np.bincount(y[k]), [5, 5, 5, 5])
    assert np.array_equal(k, subsample(y, 20, seed=0))
    assert len(subsample(y, 3, seed=0)) == 3  # fewer than classes: plain random
    assert np.array_equal(subsample(y, None, 0), np.arange(100))
    with pytest.raises(ValueError, match=">= 1 or None"):
        subsample(y, 0, 0)
