"""Typed state <-> (named arrays, JSON): how server and client state is checkpointed, without pickle.

A state is a tree of dicts (string keys), lists, numpy arrays (any dtype: bool masks, integer
ids, float64 ledgers), torch tensors (stored as numpy) and JSON scalars (None, bool, int,
float, str). :func:`flatten` splits it into named arrays (safetensors-ready) and a JSON
skeleton; :func:`unflatten` rebuilds it exactly: floats survive bit for bit (JSON uses the
shortest round-trip repr; NaN and infinities are kept), dtypes and shapes are preserved.
Tuples come back as lists.

Example:
    >>> import numpy as np
    >>> state = {"alpha": 1.5, "mask": np.array([True, False]), "ledger": [{"sigma": 1.1, "steps": 30}], "m": None}
    >>> arrays, skeleton = flatten(state)
    >>> sorted(arrays)
    ['mask']
    >>> back = unflatten(arrays, skeleton)
    >>> back["alpha"], back["mask"].dtype, back["ledger"][0]["steps"], back["m"]
    (1.5, dtype('bool'), 30, None)
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping

import numpy as np


def _encode(node: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, Mapping):
        bad = [k for k in node if not isinstance(k, str)]
        if bad:
            raise TypeError(f"state keys must be strings; {path or 'the root'} has {bad[:3]}")
        return {"d": {k: _encode(v, f"{path}/{k}" if path else k, arrays) for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        return {"l": [_encode(v, f"{path}/{i}" if path else str(i), arrays) for i, v in enumerate(node)]}
    if hasattr(node, "detach") and hasattr(node, "cpu"):           # a torch tensor
        node = node.detach().cpu().numpy()
    if isinstance(node, np.ndarray):
        name = path or "."
        while name in arrays:                                     # keys containing "/" could collide
            name += "'"
        arrays[name] = np.asarray(node, order="C")       # (ascontiguousarray would make 0-d arrays 1-d)
        return {"a": name}
    if isinstance(node, np.generic):
        node = node.item()
    if isinstance(node, float) and not math.isfinite(node):
        return {"f": struct.pack(">d", node).hex()}               # NaN sign and payload kept too
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"v": node}
    raise TypeError(f"state entry {path or 'the root'} is a {type(node).__name__}: use arrays, numbers, "
                    "strings, lists and dicts")


def flatten(state: Any) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of ``state`` by path, and the JSON skeleton that :func:`unflatten` needs."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _encode(state, "", arrays)
    return arrays, json.dumps(skeleton, allow_nan=False, separators=(",", ":"))


def _decode(node: dict, arrays: Mapping[str, np.ndarray]) -> Any:
    if "d" in node:
        return {k: _decode(v, arrays) for k, v in node["d"].items()}
    if "l" in node:
        return [_decode(v, arrays) for v in node["l"]]
    if "a" in node:
        if node["a"] not in arrays:
            raise ValueError(f"state array '{node['a']}' is missing")
        return np.asarray(arrays[node["a"]])
    if "f" in node:
        return struct.unpack(">d", bytes.fromhex(node["f"]))[0]
    return node["v"]


def unflatten(arrays: Mapping[str, np.ndarray], skeleton: str) -> Any:
    """Rebuild a state from :func:`flatten`'s output."""
    return _decode(json.loads(skeleton), arrays)
