"""Tests for fedsim.results.checkpoint: safetensors round-trip, atomicity, type checks."""

from __future__ import annotations

import pytest
import torch

from fedsim.results import checkpoint
from fedsim.results.checkpoint import load_checkpoint, save_checkpoint


def test_roundtrip_with_metadata(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"w": base.t(), "b": torch.ones(3, dtype=torch.int64), "tied": base, "row": base[1],
               "p": torch.nn.Parameter(torch.zeros(2))}
    path = tmp_path / "ck" / "model.safetensors"
    save_checkpoint(path, tensors, {"round": "5", "config_sha256": "abc"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"round": "5", "config_sha256": "abc"}
    assert set(loaded) == set(tensors)
    for key, t in tensors.items():
        assert torch.equal(loaded[key], t.detach()) and loaded[key].dtype == t.dtype
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]


def test_no_metadata_gives_empty_dict(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", {"x": torch.zeros(1)})
    assert load_checkpoint(tmp_path / "m.safetensors")[1] == {}


@pytest.mark.parametrize("tensors, metadata", [
    ({"x": [1.0, 2.0]}, None),
    ({"x": 1.0}, None),
    ({"x": torch.zeros(1)}, {"round": 5}),
])
def test_refuses_non_tensors_and_non_str_metadata(tmp_path, tensors, metadata):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.safetensors", tensors, metadata)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"x": torch.zeros(2)})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert torch.equal(load_checkpoint(path)[0]["x"], torch.zeros(2))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")
