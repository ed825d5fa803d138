"""Tests of the IDX reader and the Fashion-MNIST loader (fake files + the Debian ones)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import DataUnavailableError, load_dataset
from fedsim.data import idx as idxmod
from fedsim.data.idx import parse_idx, read_idx


def idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype("uint8"): 8, np.dtype("int16"): 0x0B, np.dtype("float32"): 0x0D}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + dims + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != "uint8" else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = read_idx(path)
    assert out.dtype == arr.dtype and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_parse_idx_rejects_garbage(tmp_path):
    with pytest.raises(ValueError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01abcd")
    bad = idx_bytes(np.zeros(5, np.uint8))[:-1]
    (tmp_path / "b").write_bytes(bad)
    with pytest.raises(ValueError, match=r"b: IDX payload size does not match dims \[5\]"):
        read_idx(tmp_path / "b")


def _fake_fashion(directory: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        hashes[stem] = hashlib.sha256(raw).hexdigest()
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return hashes


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(idxmod, "DEBIAN_DIR", tmp_path / "no-debian")


def test_fashion_from_root(tmp_path, monkeypatch, no_system_copy):
    monkeypatch.setattr(idxmod, "RAW_SHA256", _fake_fashion(tmp_path / "fm", gz=False))
    ds = load_dataset("fashion_mnist", root=str(tmp_path / "fm"), cache_dir=str(tmp_path / "c"),
                      test_fraction=0.5, download=False)
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert ds.source == str(tmp_path / "fm") and "MIT" in ds.license
    sub = load_dataset("fashion_mnist", root=str(tmp_path / "fm"), max_train=20, max_test=10,
                       seed=3, download=False)
    assert len(sub.y_train) == 20 and np.array_equal(np.bincount(sub.y_train), [2] * 10)
    assert len(sub.y_test) == 10


def test_fashion_rejects_modified_files(tmp_path, monkeypatch, no_system_copy):
    hashes = _fake_fashion(tmp_path / "fm")
    hashes["t10k-labels-idx1-ubyte"] = "0" * 64
    monkeypatch.setattr(idxmod, "RAW_SHA256", hashes)
    with pytest.raises(ValueError, match="not the official Fashion-MNIST file t10k-labels"):
        load_dataset("fashion_mnist", root=str(tmp_path / "fm"), download=False)


def test_fashion_unavailable_names_the_install_command(tmp_path, no_system_copy):
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("fashion_mnist", root=str(tmp_path), cache_dir=str(tmp_path / "c"),
                     download=False)
    msg = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "data.root" in msg
    assert "download=False" in msg


def test_fashion_download_is_verified_and_cached(tmp_path, monkeypatch, no_system_copy):
    hashes = _fake_fashion(tmp_path / "mirror")
    monkeypatch.setattr(idxmod, "RAW_SHA256", hashes)
    monkeypatch.setattr(idxmod, "BASE_URL", (tmp_path / "mirror").as_uri() + "/")
    ds = load_dataset("fashion_mnist", cache_dir=str(tmp_path / "c"))
    assert len(ds.y_train) == 40 and ds.source == str(tmp_path / "c" / "fashion-mnist")
    assert sorted(p.name for p in (tmp_path / "c" / "fashion-mnist").iterdir()) == \
        sorted(f"{s}.gz" for s in hashes)
    monkeypatch.setattr(idxmod, "BASE_URL", "http://127.0.0.1:9/")   # cache hit: no network
    assert len(load_dataset("fashion_mnist", cache_dir=str(tmp_path / "c")).y_test) == 20


def test_fashion_download_failures(tmp_path, monkeypatch, no_system_copy):
    hashes = _fake_fashion(tmp_path / "mirror")
    monkeypatch.setattr(idxmod, "BASE_URL", (tmp_path / "mirror").as_uri() + "/")
    monkeypatch.setattr(idxmod, "RAW_SHA256", {**hashes, "train-images-idx3-ubyte": "0" * 64})
    with pytest.raises(DataUnavailableError, match="download from .* failed: .*not the official"):
        load_dataset("fashion_mnist", cache_dir=str(tmp_path / "c"))
    assert not list((tmp_path / "c" / "fashion-mnist").glob("train-images*"))  # no bad file kept
    monkeypatch.setattr(idxmod, "BASE_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", cache_dir=str(tmp_path / "c2"))


@pytest.mark.data
def test_fashion_mnist_debian_files():
    if not all((idxmod.DEBIAN_DIR / f"{s}.gz").is_file() for s in idxmod.RAW_SHA256):
        pytest.skip("not installed: sudo apt-get install dataset-fashion-mnist")
    ds = load_dataset("fashion_mnist", download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.y_train), [6000] * 10)
    assert np.array_equal(np.bincount(ds.y_test), [1000] * 10)
    assert abs(float(ds.x_train.mean())) < 1e-3 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert ds.source == str(idxmod.DEBIAN_DIR)
