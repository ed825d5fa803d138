"""FedHyper server schedulers (G, GM, SL and the server side of CL) as pure cores.

Every scheduler is a :class:`FedHyperServer`: an optax-style ``init(params) -> state`` and
``update(params, delta, state) -> (params, state)`` over ``list[np.ndarray]`` in float64, plus
``global_lr(state)`` (the LR on the aggregate in the last step) and ``local_lr_scale(state)``
(the factor on the client LR to send next round). ``delta`` is the *raw* weighted mean update
from :func:`fedsim.algorithms.aggregate.mean_update`; ``delta=None`` is a round with no
replies (params and state unchanged). The state is a dict of float64 arrays (scalars 0-d,
model-sized entries as lists over the trainable arrays) and never mutated in place; use
:func:`state_to_arrays` / :func:`state_from_arrays` to checkpoint it.

Hypergradients are inner products over all trainable float arrays jointly, in float64, in
canonical (state_dict) order. A non-finite one skips the hypergradient update: the scheduler
state stays as it was, ``hypergrad_skipped`` is incremented and the round still steps with
the current LR. Buffers (non-trainable float arrays) always take FedAvg's ``1.0 * delta``.

Example:
    >>> import numpy as np
    >>> opt = fedhyper_server("g")
    >>> x = [np.zeros(2, np.float32)]
    >>> state = opt.init(x)
    >>> for _ in range(2):
    ...     x, state = opt.update(x, [np.array([0.1, 0.2])], state)
    >>> round(opt.global_lr(state), 6)   # 1 + <d, d> = 1.05
    1.05

References:
    Z. Wang, J. Wang, A. Li. FedHyper: A Universal and Robust Learning Rate Scheduler for
    Federated Learning with Hypergradient Descent. arXiv:2310.03156 (ICLR 2024).
    Baydin et al., Online Learning Rate Adaptation with Hypergradient Descent, arXiv:1703.04782.
    FedExp: Jhunjhunwala et al., arXiv:2301.09604.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fedsim.algorithms.aggregate import Arrays, ServerOptimizer, apply_step, is_float

HyperState = dict[str, Any]
VARIANTS = ("g", "gm", "sl", "cl", "g+cl", "gm+cl")
_LIST_KEYS = ("delta_prev", "m")


@dataclass(frozen=True)
class FedHyperServer(ServerOptimizer):
    """A :class:`ServerOptimizer` with the two LR read-outs the strategy needs.

    Attributes:
        global_lr: ``state -> float``, the LR applied to the aggregate in the last step
            (before any step: the initial one).
        local_lr_scale: ``state -> float``, the factor on the base client LR to send in the
            next round (SL's lambda; 1.0 for schedulers that do not touch the client LR).
    """

    global_lr: Callable[[HyperState], float]
    local_lr_scale: Callable[[HyperState], float]


# ---------------------------------------------------------------- helpers


def _scalar(v: float) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


def _clip(v: float, bounds: tuple[float, float]) -> float:
    return min(max(v, bounds[0]), bounds[1])


def _bounds(name: str, b: Sequence[float]) -> tuple[float, float]:
    lo, hi = float(b[0]), float(b[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name}: need finite bounds with low <= high, got {tuple(b)}")
    return lo, hi


def trainable_mask(params: Sequence[np.ndarray], trainable: Sequence[bool] | None) -> list[bool]:
    """Which arrays are hypergradient-trained: float arrays, further masked by ``trainable``."""
    flags = [True] * len(params) if trainable is None else [bool(t) for t in trainable]
    if len(flags) != len(params):
        raise ValueError(f"trainable has {len(flags)} entries but there are {len(params)} arrays")
    return [is_float(p) and t for p, t in zip(params, flags)]


def inner(u: Sequence[np.ndarray], v: Sequence[np.ndarray]) -> float:
    """``<u, v>`` over all arrays jointly, accumulated in float64 in list order (reproducible)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):    # a non-finite result is handled by callers
        for a, b in zip(u, v, strict=True):
            total += float(np.sum(np.multiply(a, b, dtype=np.float64).ravel(), dtype=np.float64))
    return total


def _select(delta: Sequence[np.ndarray], mask: list[bool]) -> Arrays:
    if len(delta) != len(mask):
        raise ValueError(f"delta has {len(delta)} arrays but params have {len(mask)}")
    return [np.array(d, dtype=np.float64, copy=True) for d, m in zip(delta, mask) if m]


def _step(params: Sequence[np.ndarray], delta: Sequence[np.ndarray], mask: list[bool],
          trained: Arrays) -> Arrays:
    """``x + step``: ``trained`` (in mask order) on trainable arrays, ``1.0 * delta`` on buffers."""
    it = iter(trained)
    return apply_step(params, [next(it) if m else 1.0 * np.asarray(d, np.float64) for d, m in zip(delta, mask)])


def _base_state(**scalars: float) -> HyperState:
    state: HyperState = {k: _scalar(v) for k, v in scalars.items()}
    state.update(delta_prev=[], hypergrad_skipped=_scalar(0.0), round=_scalar(0.0))
    return state


def _advance(state: HyperState, skipped: bool, **changes: Any) -> HyperState:
    """A new state dict: ``changes`` applied (unless skipped), round and skip counter advanced."""
    new = dict(state)
    if skipped:
        new["hypergrad_skipped"] = _scalar(float(state["hypergrad_skipped"]) + 1.0)
    else:
        new.update({k: _scalar(v) if isinstance(v, float) else v for k, v in changes.items()})
    new["round"] = _scalar(float(state["round"]) + 1.0)
    return new


def _hypergrad(d: Arrays, prev: Arrays) -> Optional[float]:
    """``<d, prev>``, or None when there is no previous update; NaN when non-finite."""
    if not prev:
        return None
    h = inner(d, prev)
    return h if math.isfinite(h) else math.nan


def previous_update(state: HyperState) -> Optional[Arrays]:
    """The raw aggregate of the last round over the trainable arrays (what CL clients get).

    Returns None before the first round. The arrays are the state's own: do not modify them.
    """
    prev = state.get("delta_prev")
    return list(prev) if prev else None


# ---------------------------------------------------------------- FedHyper schedulers


def _g(alpha0: float, beta_g: float, bounds: tuple[float, float], trainable, name: str) -> FedHyperServer:
    def update(params, delta, state):
        if delta is None:
            return list(params), state
        mask = trainable_mask(params, trainable)
        d, alpha = _select(delta, mask), float(state["alpha"])
        h = _hypergrad(d, state["delta_prev"])
        skipped = h is not None and math.isnan(h)
        if h is not None and not skipped:
            alpha = _clip(alpha + beta_g * h, bounds)
        new = _advance(state, skipped, alpha=alpha, delta_prev=d)
        return _step(params, delta, mask, [alpha * di for di in d]), new

    return FedHyperServer(name, lambda params: _base_state(alpha=alpha0), update,
                          lambda s: float(s["alpha"]), lambda s: 1.0)


def _gm(alpha0: float, beta_g: float, bounds: tuple[float, float], mu: float, trainable,
        name: str) -> FedHyperServer:
    def init(params):
        return {**_base_state(a=0.0), "m": []}

    def update(params, delta, state):
        if delta is None:
            return list(params), state
        mask = trainable_mask(params, trainable)
        d, a, m_old = _select(delta, mask), float(state["a"]), state["m"]
        h = _hypergrad(d, m_old)
        skipped = h is not None and math.isnan(h)
        if h is not None and not skipped:
            a = _clip(a + beta_g * h, bounds)
        m = [di + mu * mi for di, mi in zip(d, m_old)] if m_old else [di.copy() for di in d]
        new = _advance(state, skipped, a=a, m=m, delta_prev=d)
        m_used = new["m"]
        step = [alpha0 * di + a * mi for di, mi in zip(d, m_used)] if a != 0.0 else [alpha0 * di for di in d]
        return _step(params, delta, mask, step), new

    return FedHyperServer(name, init, update, lambda s: alpha0 + float(s["a"]), lambda s: 1.0)


def _sl(alpha0: float, beta_sl: float, bounds: tuple[float, float], state_clip: bool, trainable,
        name: str) -> FedHyperServer:
    key = "lam" if state_clip else "sl_acc"

    def update(params, delta, state):
        if delta is None:
            return list(params), state
        mask = trainable_mask(params, trainable)
        d, v = _select(delta, mask), float(state[key])
        h = _hypergrad(d, state["delta_prev"])
        skipped = h is not None and math.isnan(h)
        if h is not None and not skipped:
            v = _clip(v + beta_sl * h, bounds) if state_clip else v + beta_sl * h
        new = _advance(state, skipped, **{key: v, "delta_prev": d})
        return _step(params, delta, mask, [alpha0 * di for di in d]), new

    def scale(state):
        return float(state[key]) if state_clip else _clip(1.0 + float(state[key]), bounds)

    init_value = 1.0 if state_clip else 0.0
    return FedHyperServer(name, lambda params: _base_state(**{key: init_value}), update, lambda s: alpha0, scale)


def _cl(alpha0: float, trainable, name: str) -> FedHyperServer:
    def update(params, delta, state):
        if delta is None:
            return list(params), state
        mask = trainable_mask(params, trainable)
        d = _select(delta, mask)
        return _step(params, delta, mask, [alpha0 * di for di in d]), _advance(state, False, delta_prev=d)

    return FedHyperServer(name, lambda params: _base_state(), update, lambda s: alpha0, lambda s: 1.0)


def fedhyper_server(variant: str, *, alpha0: float = 1.0, beta_g: float = 1.0,
                    alpha_bounds: Sequence[float] = (0.2, 5.0), gm_bounds: Sequence[float] = (-0.2, 4.0),
                    gm_momentum: float = 0.9, beta_sl: float = 1.0, sl_bounds: Sequence[float] = (0.1, 10.0),
                    sl_state_clip: bool = True, trainable: Sequence[bool] | None = None) -> FedHyperServer:
    """The server part of a FedHyper variant.

    Args:
        variant: ``g``, ``gm``, ``sl``, ``cl``, ``g+cl`` or ``gm+cl``. ``cl`` is FedAvg at
            ``alpha0`` on the server (it keeps ``delta_prev`` for the clients); ``g+cl`` is G
            and ``gm+cl`` is GM (the reference's "FULL").
        alpha0: initial (G) or base (GM, SL, CL) server LR.
        beta_g: hyper-LR of G and GM.
        alpha_bounds: clip of G's alpha (the state itself: no wind-up).
        gm_bounds, gm_momentum: clip of GM's ``a`` and its momentum ``mu``.
        beta_sl, sl_bounds: hyper-LR of SL and the clip of lambda (a factor on the client LR).
        sl_state_clip: clip lambda itself (canonical). False: unclipped accumulator ``A``,
            ``lambda = clip(1 + A)`` (the reference; winds up).
        trainable: per-array mask (state_dict order) of the arrays that enter inner products
            and are LR-scaled; non-float arrays are never trainable. None: all float arrays.

    Returns:
        A :class:`FedHyperServer`; ``.name`` is ``fedhyper-<variant>``.

    Example:
        >>> import numpy as np
        >>> opt = fedhyper_server("sl", beta_sl=10.0)
        >>> x, s = [np.zeros(1)], None
        >>> s = opt.init(x)
        >>> for _ in range(2):
        ...     x, s = opt.update(x, [np.array([0.1])], s)
        >>> opt.local_lr_scale(s)   # 1 + 10 * 0.01
        1.1

    References:
        arXiv:2310.03156 (FedHyper), spec ``specs/fedhyper.md`` section 2.2.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown FedHyper variant '{variant}' (known: {', '.join(VARIANTS)})")
    name = f"fedhyper-{variant}"
    if variant in ("g", "g+cl"):
        return _g(float(alpha0), float(beta_g), _bounds("alpha_bounds", alpha_bounds), trainable, name)
    if variant in ("gm", "gm+cl"):
        return _gm(float(alpha0), float(beta_g), _bounds("gm_bounds", gm_bounds), float(gm_momentum), trainable, name)
    if variant == "sl":
        return _sl(float(alpha0), float(beta_sl), _bounds("sl_bounds", sl_bounds), bool(sl_state_clip), trainable,
                   name)
    return _cl(float(alpha0), trainable, name)


# ---------------------------------------------------------------- checkpointing


def state_to_arrays(state: HyperState) -> dict[str, np.ndarray]:
    """Flatten a scheduler state to named float64 arrays (safetensors-ready, no pickle).

    Scalars become shape-(1,) arrays; a list entry ``k`` becomes ``k.n`` (its length) and
    ``k.0``, ``k.1``, ... Inverse: :func:`state_from_arrays`.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if isinstance(value, list):
            out[f"{key}.n"] = np.array([len(value)], dtype=np.float64)
            out.update({f"{key}.{i}": np.ascontiguousarray(v, dtype=np.float64) for i, v in enumerate(value)})
        else:
            out[key] = np.asarray(value, dtype=np.float64).reshape(1).copy()
    return out


def state_from_arrays(arrays: dict[str, np.ndarray]) -> HyperState:
    """Rebuild a scheduler state from :func:`state_to_arrays` output (bit-exact)."""
    lists = {k[:-2]: int(arrays[k][0]) for k in arrays if k.endswith(".n")}
    state: HyperState = {k: [np.array(arrays[f"{k}.{i}"], dtype=np.float64) for i in range(n)]
                         for k, n in lists.items()}
    for key, value in arrays.items():
        if key.split(".")[0] not in lists:
            state[key] = _scalar(float(np.asarray(value).reshape(-1)[0]))
    return state
