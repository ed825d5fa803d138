"""The typed state codec (fedsim/core/state.py): flatten -> (named arrays, JSON skeleton) -> unflatten."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fedsim.core.state import flatten, unflatten


def _bits(v: float) -> bytes:
    return struct.pack("<d", v)


def _round_trip(state, tmp_path=None):
    arrays, skeleton = flatten(state)
    json.loads(skeleton)                                          # the skeleton is a JSON string
    if tmp_path is not None:                                      # through a real safetensors file
        save_file(arrays, str(tmp_path / "s.safetensors"))
        arrays = load_file(str(tmp_path / "s.safetensors"))
    return unflatten(arrays, skeleton)


def test_arrays_round_trip_dtype_shape_and_values(tmp_path):
    """bool masks, int64 ids, float64 ledgers and float32 arrays keep dtype, shape and bits (via safetensors)."""
    state = {"mask": np.array([[True, False], [False, True]]), "ids": np.array([2**62, -5], np.int64),
             "ledger": np.array([0.1, np.nan, -np.inf, -0.0, 5e-324]), "f32": np.arange(6, dtype=np.float32).reshape(2, 3)}
    back = _round_trip(state, tmp_path)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == v.tobytes()


def test_zero_d_arrays_keep_their_shape():
    """0-d arrays (scalar counters stored as arrays) come back 0-d (shape () silently becoming (1,))."""
    state = {"z": np.array(1.5), "b": np.array(True), "i": np.array(-3, np.int64)}
    arrays, skeleton = flatten(state)
    assert {k: v.shape for k, v in arrays.items()} == {"z": (), "b": (), "i": ()}
    back = unflatten(arrays, skeleton)
    assert {k: (v.shape, v.dtype) for k, v in back.items()} == {k: ((), v.dtype) for k, v in state.items()}


def test_zero_d_arrays_keep_value_and_dtype(tmp_path):
    """0-d arrays keep their value and dtype (what still holds while the shape bug is open)."""
    state = {"z": np.array(1.5), "b": np.array(True), "i": np.array(-3, np.int64)}
    back = _round_trip(state, tmp_path)
    assert {k: (v.dtype, v.reshape(-1).tolist()) for k, v in back.items()} == \
        {k: (v.dtype, v.reshape(-1).tolist()) for k, v in state.items()}


def test_torch_tensors_become_numpy():
    """Torch tensors (also requiring grad) are stored as numpy with their dtype (pickle, or a crash)."""
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    arrays, skeleton = flatten({"t": t, "n": torch.tensor([3], dtype=torch.int64)})
    assert isinstance(arrays["t"], np.ndarray) and arrays["t"].dtype == np.float32 and arrays["n"].dtype == np.int64
    back = unflatten(arrays, skeleton)
    assert isinstance(back["t"], np.ndarray) and back["t"].tolist() == [1.0, 2.0] and back["n"].tolist() == [3]


def test_nested_dicts_lists_scalars_and_none(tmp_path):
    """Nested trees of dicts, lists, None, bool, int, float, str round-trip; tuples come back as lists."""
    state = {"basis_id": 3, "optimizer": [{"alpha": 1.25, "delta_prev": None, "hypergrad_skipped": 0},
                                          {"m": {"w": np.ones(2)}}],
             "plugins": {"cl": None, "name": "x", "flag": False, "pair": (0.2, 5.0), "big": 2**70},
             "empty": {}, "nil": []}
    back = _round_trip(state, tmp_path)
    assert back["basis_id"] == 3 and type(back["basis_id"]) is int
    assert back["optimizer"][0] == {"alpha": 1.25, "delta_prev": None, "hypergrad_skipped": 0}
    assert type(back["optimizer"][0]["hypergrad_skipped"]) is int
    assert back["optimizer"][1]["m"]["w"].tolist() == [1.0, 1.0]
    assert back["plugins"] == {"cl": None, "name": "x", "flag": False, "pair": [0.2, 5.0], "big": 2**70}
    assert back["plugins"]["flag"] is False and back["empty"] == {} and back["nil"] == []
    assert list(back) == list(state) and list(back["plugins"]) == list(state["plugins"])   # key order kept


def test_floats_survive_bit_for_bit():
    """Python floats incl. NaN, +-inf, -0.0, subnormals and 0.1+0.2 keep their exact bits (repr rounding)."""
    values = [0.1 + 0.2, 1 / 3, math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308,
              float(np.nextafter(1.0, 2.0))]
    back = _round_trip({"v": values, "np": np.float64(0.1 + 0.2)})
    assert [_bits(v) for v in back["v"]] == [_bits(v) for v in values]
    assert [float.hex(v) for v in back["v"]] == [float.hex(v) for v in values]
    assert _bits(back["np"]) == _bits(0.1 + 0.2)


def test_negative_nan_keeps_its_bits():
    """A NaN produced by arithmetic (inf - inf: sign bit set on x86) keeps its bits (resume bit-diffs)."""
    nan = struct.unpack("<d", bytes.fromhex("000000000000f8ff"))[0]     # x86's default NaN, sign bit set
    assert math.isnan(nan) and _bits(nan) != _bits(math.nan)
    assert _bits(_round_trip({"v": nan})["v"]) == _bits(nan)


def test_keys_with_slashes_do_not_collide(tmp_path):
    """A key containing "/" and the nested path it spells stay two arrays (silent overwrite)."""
    for state in ({"a/b": np.zeros(1), "a": {"b": np.ones(1)}}, {"a": {"b": np.ones(1)}, "a/b": np.zeros(1)},
                  {"a/b": np.zeros(1), "a": {"b": np.ones(1)}, "a/b'": np.full(1, 2.0)},
                  {"0": np.zeros(1), "l": [np.ones(1)], "l/0": np.full(1, 2.0)}):
        arrays, _ = flatten(state)
        assert len(arrays) == sum(1 for _ in _leaves(state))
        back = _round_trip(state, tmp_path)
        assert sorted(_leaves(back)) == sorted(_leaves(state))


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    else:
        yield path, np.asarray(node).tolist()


def test_unsupported_objects_are_refused():
    """Sets, objects and non-string keys raise TypeError (silent str() or pickle)."""
    for bad in ({"s": {1, 2}}, {"o": object()}, {1: np.zeros(1)}, {"d": {"ok": 1, 2: 3}}, {"b": b"bytes"}):
        with pytest.raises(TypeError):
            flatten(bad)


def test_missing_array_is_a_value_error():
    """A checkpoint missing one array fails loudly (a None or KeyError deep in resume)."""
    arrays, skeleton = flatten({"m": {"w": np.ones(2), "b": np.zeros(1)}})
    del arrays["m/b"]
    with pytest.raises(ValueError, match="m/b"):
        unflatten(arrays, skeleton)
