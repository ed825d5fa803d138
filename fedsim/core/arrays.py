"""Named arrays: the model (and every other array set) as an ordered ``name -> numpy array`` mapping.

Order is the model's ``state_dict`` order and is part of the contract: float64 accumulations
visit arrays in it, so results never depend on dict construction elsewhere. Float arrays
are trained; integer arrays (counters) are carried unchanged.

Example:
    >>> import numpy as np
    >>> x = {"w": np.zeros(2, np.float32)}
    >>> d = mean_update(x, [{"w": np.array([1., 3.], np.float32)}, {"w": np.array([3., 1.], np.float32)}], [1, 1])
    >>> apply_updates(x, d)["w"].tolist(), inner(d, d)
    ([2.0, 2.0], 8.0)
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

#: An ordered mapping of array name to array (the model's ``state_dict`` order).
Named = dict[str, np.ndarray]


def is_float(a: np.ndarray) -> bool:
    """Whether an array is trained (floating point); integer buffers are carried, not averaged."""
    return np.issubdtype(a.dtype, np.floating)


def select(arrays: Mapping[str, np.ndarray], names: Iterable[str]) -> Named:
    """The entries of ``arrays`` whose names are in ``names``, in ``arrays``' order."""
    keep = set(names)
    return {k: v for k, v in arrays.items() if k in keep}


def mean_update(params: Mapping[str, np.ndarray], clients: Sequence[Mapping[str, np.ndarray]],
                weights: Sequence[float]) -> Named:
    """Weighted mean of client updates ``w_m - x`` per array, accumulated in float64 in the order given.

    Callers pass clients in a canonical order (sorted by client id) so the result does not
    depend on reply arrival order. Integer arrays, and arrays no client sent (e.g. frozen LoRA
    factors), get a zero update.

    Args:
        params: the global arrays ``x``.
        clients: each client's new arrays ``w_m`` (a subset of ``params``' names, the same for all).
        weights: one non-negative weight per client (normalised here).
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(clients) == 0 or w.sum() <= 0:
        raise ValueError("mean_update needs at least one client with a positive weight")
    w = w / w.sum()
    out: Named = {}
    for name, x in params.items():
        if not is_float(x) or name not in clients[0]:
            out[name] = np.zeros(x.shape, np.float64)
            continue
        acc = np.zeros(x.shape, np.float64)
        x64 = x.astype(np.float64)
        for wm, client in zip(w, clients):
            acc += wm * (client[name].astype(np.float64) - x64)
        out[name] = acc
    return out


def apply_updates(params: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray]) -> Named:
    """``x + step`` per array, in float64 and cast back to each array's dtype; integer arrays and
    arrays without an update are copied unchanged."""
    out: Named = {}
    for name, x in params.items():
        step = updates.get(name)
        out[name] = (x.astype(np.float64) + step).astype(x.dtype) if step is not None and is_float(x) else x.copy()
    return out


def inner(u: Mapping[str, np.ndarray], v: Mapping[str, np.ndarray]) -> float:
    """``<u, v>`` over all arrays jointly, accumulated in float64 in ``u``'s order (reproducible).

    Overflow is not an error here: callers check the result for finiteness.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for name, a in u.items():
            total += float(np.sum(np.multiply(a, v[name], dtype=np.float64).ravel(), dtype=np.float64))
    return total


def float64(arrays: Mapping[str, np.ndarray]) -> Named:
    """Float64 copies of every array (state that must not alias the caller's arrays)."""
    return {k: np.array(v, dtype=np.float64, copy=True) for k, v in arrays.items()}
