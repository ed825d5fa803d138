"""Aggregation and server optimizers as pure functions over lists of numpy arrays.

A round: each client returns its new weights ``w_m``; the server forms the weighted mean
update ``delta = sum_m p_m (w_m - x)`` in float64, then a server optimizer turns ``x`` and
``delta`` into the next global model. FedAvg with ``server_lr=1`` is ``x + delta`` exactly.

Server optimizers follow the optax style: ``init(params) -> state`` and
``update(params, delta, state) -> (params, state)``, with state a dict of arrays
(checkpointable as it is).

Example:
    >>> import numpy as np
    >>> x = [np.zeros(2, np.float32)]
    >>> d = mean_update(x, [[np.array([1., 3.], np.float32)], [np.array([3., 1.], np.float32)]], [1, 1])
    >>> opt = server_optimizer("fedavg")
    >>> new, _ = opt.update(x, d, opt.init(x))
    >>> new[0].tolist()
    [2.0, 2.0]

References:
    FedAvg: McMahan et al., arXiv:1602.05629. FedAvgM: Hsu et al., arXiv:1909.06335.
    FedAdam: Reddi et al., arXiv:2003.00295. FedProx: Li et al., arXiv:1812.06127.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Arrays = list[np.ndarray]
State = dict[str, Arrays]


def is_float(a: np.ndarray) -> bool:
    """Whether an array is trained (floating point); integer buffers are carried, not averaged."""
    return np.issubdtype(a.dtype, np.floating)


def mean_update(params: Sequence[np.ndarray], client_params: Sequence[Sequence[np.ndarray]],
                weights: Sequence[float]) -> Arrays:
    """Weighted mean of client updates ``w_m - x`` (float64 accumulation, in the order given).

    Callers pass clients in a canonical order (sorted by client id) so the result does not
    depend on reply arrival order. Non-float arrays get a zero update.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(client_params) == 0 or w.sum() <= 0:
        raise ValueError("mean_update needs at least one client with a positive weight")
    w = w / w.sum()
    out: Arrays = []
    for i, x in enumerate(params):
        if not is_float(x):
            out.append(np.zeros(x.shape, np.float64))
            continue
        acc = np.zeros(x.shape, np.float64)
        x64 = x.astype(np.float64)
        for wm, cp in zip(w, client_params):
            acc += wm * (cp[i].astype(np.float64) - x64)
        out.append(acc)
    return out


def apply_step(params: Sequence[np.ndarray], step: Sequence[np.ndarray]) -> Arrays:
    """``x + step`` per array, computed in float64 and cast back to each array's dtype."""
    return [(x.astype(np.float64) + s).astype(x.dtype) if is_float(x) else x.copy() for x, s in zip(params, step)]


@dataclass(frozen=True)
class ServerOptimizer:
    """A pure server optimizer: ``init`` builds state, ``update`` returns new params and state."""

    name: str
    init: Callable[[Sequence[np.ndarray]], State]
    update: Callable[[Sequence[np.ndarray], Sequence[np.ndarray], State], tuple[Arrays, State]]


def fedavg(server_lr: float = 1.0) -> ServerOptimizer:
    """FedAvg: ``x <- x + server_lr * delta``."""
    def update(params, delta, state):
        return apply_step(params, [server_lr * d for d in delta]), state
    return ServerOptimizer("fedavg", lambda params: {}, update)


def fedavgm(server_lr: float = 1.0, server_momentum: float = 0.9) -> ServerOptimizer:
    """FedAvgM: ``m <- mu m + delta``; ``x <- x + server_lr * m``."""
    def init(params):
        return {"m": [np.zeros(p.shape, np.float64) for p in params]}

    def update(params, delta, state):
        m = [server_momentum * mi + d for mi, d in zip(state["m"], delta)]
        return apply_step(params, [server_lr * mi for mi in m]), {"m": m}
    return ServerOptimizer("fedavgm", init, update)


def fedadam(server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """FedAdam (Reddi et al.): Adam moments of the pseudo-gradient ``-delta``, no bias correction."""
    def init(params):
        return {"m": [np.zeros(p.shape, np.float64) for p in params],
                "v": [np.zeros(p.shape, np.float64) for p in params]}

    def update(params, delta, state):
        m = [beta_1 * mi + (1 - beta_1) * d for mi, d in zip(state["m"], delta)]
        v = [beta_2 * vi + (1 - beta_2) * d * d for vi, d in zip(state["v"], delta)]
        step = [server_lr * mi / (np.sqrt(vi) + tau) for mi, vi in zip(m, v)]
        return apply_step(params, step), {"m": m, "v": v}
    return ServerOptimizer("fedadam", init, update)


def server_optimizer(name: str, **kwargs: float) -> ServerOptimizer:
    """Build a server optimizer by strategy name; ``fedprox`` is FedAvg on the server side."""
    if name in ("fedavg", "fedprox"):
        return fedavg(kwargs.get("server_lr", 1.0))
    if name == "fedavgm":
        return fedavgm(**kwargs)
    if name == "fedadam":
        return fedadam(**kwargs)
    raise ValueError(f"unknown strategy '{name}' (known: fedavg, fedavgm, fedadam, fedprox)")
