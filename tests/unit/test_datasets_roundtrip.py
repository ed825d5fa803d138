"""save_dataset / read_dataset: how the workers engine hands its loaded data set to the zygote."""

from __future__ import annotations

import numpy as np

from fedsim.data import Dataset, load_dataset, read_dataset, save_dataset


def _same(a: Dataset, b: Dataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), field
    for field in ("name", "num_classes", "input_shape", "kind", "id_names", "source", "license"):
        assert getattr(a, field) == getattr(b, field), field
    assert (a.train_ids is None) == (b.train_ids is None)
    if a.train_ids is not None:
        assert np.array_equal(a.train_ids, b.train_ids) and a.train_ids.dtype == b.train_ids.dtype


def test_a_bundled_set_reads_back_identical(tmp_path):
    """Catches a dropped or re-typed field (float64 images, int32 labels, a list input_shape)."""
    ds = load_dataset("digits", seed=0)
    save_dataset(ds, tmp_path / "d.npz")
    _same(ds, read_dataset(tmp_path / "d.npz"))


def test_natural_ids_and_their_names_survive(tmp_path):
    """Text sets carry natural client ids and their names (Shakespeare roles): losing them would
    make the zygote's partition by role differ from the server's."""
    rng = np.random.default_rng(0)
    ds = Dataset(name="toy", x_train=rng.integers(0, 5, (6, 4)), y_train=np.arange(6), x_test=np.zeros((2, 4), np.int64),
                 y_test=np.arange(2), num_classes=5, input_shape=(4,), kind="text",
                 train_ids=np.array([0, 0, 1, 1, 2, 2]), id_names=("A:X", "B:Y", "C:Z"), source="here", license="none")
    save_dataset(ds, tmp_path / "t.npz")
    _same(ds, read_dataset(tmp_path / "t.npz"))
