"""FedHyper's server schedulers (G, GM, SL, CL's server part) and the Decay and FedExp baselines,
as :class:`~fedsim.core.transforms.Transform` s over named arrays.

Each transform gets the *raw* aggregate ``delta`` (the weighted mean update, float64) and
returns the step: ``alpha * delta`` for G, ``alpha0 * delta + a * m`` for GM, ``alpha0 *
delta`` for SL and CL. ``report(state)`` gives ``lr_global`` (the LR on the aggregate in the
last step) and ``hypergrad_skipped``; ``downlink(state)`` gives ``lr_scale``, the factor on the
client LR of the next round (SL's lambda, Decay-SL's ``rate^t``).

Hypergradients are inner products over the transform's arrays jointly, in float64, in
canonical (state_dict) order. Pass ``trainable`` (the model's parameter names) so buffers are
left out: they then take FedAvg's ``1.0 * delta`` (the :func:`~fedsim.core.transforms.masked`
combinator). A non-finite hypergradient skips the update of the scheduler state (it stays as
it was), increments ``hypergrad_skipped``, and the round still steps with the current LR. The
state is a plain tree (floats, ints, named float64 arrays), never mutated in place.

Example:
    >>> import numpy as np
    >>> from fedsim.core.transforms import RoundInfo
    >>> opt = fedhyper_server("g")
    >>> x = {"w": np.zeros(2, np.float32)}
    >>> state = opt.init(x)
    >>> for _ in range(2):
    ...     step, state = opt.update({"w": np.array([0.1, 0.2])}, state, x, RoundInfo(1))
    >>> round(opt.report(state)["lr_global"], 6)   # 1 + <d, d> = 1.05
    1.05

References:
    Z. Wang, J. Wang, A. Li. FedHyper: A Universal and Robust Learning Rate Scheduler for
    Federated Learning with Hypergradient Descent. arXiv:2310.03156 (ICLR 2024).
    Baydin et al., Online Learning Rate Adaptation with Hypergradient Descent, arXiv:1703.04782.
    FedExp: Jhunjhunwala, Wang, Joshi, arXiv:2301.09604 (ICLR 2023).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Mapping, Optional, Sequence

import numpy as np

from fedsim.core.arrays import Named, float64, inner
from fedsim.core.transforms import Transform, masked, scale

VARIANTS = ("g", "gm", "sl", "cl", "g+cl", "gm+cl")


def _clip(v: float, bounds: tuple[float, float]) -> float:
    return min(max(v, bounds[0]), bounds[1])


def _bounds(name: str, b: Sequence[float]) -> tuple[float, float]:
    lo, hi = float(b[0]), float(b[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name}: need finite bounds with low <= high, got {tuple(b)}")
    return lo, hi


def _hypergrad(d: Named, prev: Named | None) -> Optional[float]:
    """``<d, prev>``, or None when there is no previous update; NaN when non-finite."""
    if prev is None:
        return None
    h = inner(d, prev)
    return h if math.isfinite(h) else math.nan


def _advance(state: dict, skipped: bool, **changes: Any) -> dict:
    """A new state: ``changes`` applied, or (skipped) only the skip counter incremented."""
    if skipped:
        return {**state, "hypergrad_skipped": state["hypergrad_skipped"] + 1}
    return {**state, **changes}


def _scaled(alpha: float, d: Mapping[str, np.ndarray]) -> Named:
    return {k: alpha * v for k, v in d.items()}


def _report(lr_of) -> Any:
    return lambda s: {"lr_global": lr_of(s), "hypergrad_skipped": s["hypergrad_skipped"]}


# ---------------------------------------------------------------- the schedulers


def _g(alpha0: float, beta_g: float, bounds: tuple[float, float]) -> Transform:
    def update(d, state, params, info):
        alpha = state["alpha"]
        h = _hypergrad(d, state["delta_prev"])
        skipped = h is not None and math.isnan(h)
        if h is not None and not skipped:
            alpha = _clip(alpha + beta_g * h, bounds)
        return _scaled(alpha, d), _advance(state, skipped, alpha=alpha, delta_prev=float64(d))

    return Transform(lambda params: {"alpha": alpha0, "delta_prev": None, "hypergrad_skipped": 0}, update,
                     report=_report(lambda s: s["alpha"]))


def _gm(alpha0: float, beta_g: float, bounds: tuple[float, float], mu: float) -> Transform:
    def update(d, state, params, info):
        a, m_old = state["a"], state["m"]
        h = _hypergrad(d, m_old)                    # the hypergradient uses the *old* momentum
        skipped = h is not None and math.isnan(h)
        if h is not None and not skipped:
            a = _clip(a + beta_g * h, bounds)
        m = {k: v + mu * m_old[k] for k, v in d.items()} if m_old is not None else float64(d)
        new = _advance(state, skipped, a=a, m=m)
        m_used = new["m"]
        step = {k: alpha0 * v + a * m_used[k] for k, v in d.items()} if a != 0.0 else _scaled(alpha0, d)
        return step, new

    return Transform(lambda params: {"a": 0.0, "m": None, "hypergrad_skipped": 0}, update,
                     report=_report(lambda s: alpha0 + s["a"]))


def _sl(alpha0: float, beta_sl: float, bounds: tuple[float, float], state_clip: bool) -> Transform:
    key = "lam" if state_clip else "sl_acc"

    def update(d, state, params, info):
        v = state[key]
        h = _hypergrad(d, state["delta_prev"])
        skipped = h is not None and math.isnan(h)
        if h is not None and not skipped:
            v = _clip(v + beta_sl * h, bounds) if state_clip else v + beta_sl * h
        return _scaled(alpha0, d), _advance(state, skipped, **{key: v, "delta_prev": float64(d)})

    def lr_scale(state):
        return state[key] if state_clip else _clip(1.0 + state[key], bounds)

    init = {key: 1.0 if state_clip else 0.0, "delta_prev": None, "hypergrad_skipped": 0}
    return Transform(lambda params: dict(init), update, report=_report(lambda s: alpha0),
                     downlink=lambda s: {"lr_scale": lr_scale(s)})


def _on(transform: Transform, trainable: Collection[str] | None) -> Transform:
    return transform if trainable is None else masked(transform, trainable)


def fedhyper_server(variant: str, *, alpha0: float = 1.0, beta_g: float = 1.0,
                    alpha_bounds: Sequence[float] = (0.2, 5.0), gm_bounds: Sequence[float] = (-0.2, 4.0),
                    gm_momentum: float = 0.9, beta_sl: float = 1.0, sl_bounds: Sequence[float] = (0.1, 10.0),
                    sl_state_clip: bool = True, trainable: Collection[str] | None = None) -> Transform:
    """The server part of a FedHyper variant, as a transform of the raw aggregate update.

    Args:
        variant: ``g``, ``gm``, ``sl``, ``cl``, ``g+cl`` or ``gm+cl``. ``cl`` is FedAvg at
            ``alpha0`` on the server (the clients adapt); ``g+cl`` is G and ``gm+cl`` is GM (the
            reference's "FULL"). CL's downlink of the previous update is
            :class:`fedsim.algorithms.fedhyper.PreviousUpdate`.
        alpha0: initial (G) or base (GM, SL, CL) server LR.
        beta_g: hyper-LR of G and GM.
        alpha_bounds: clip of G's alpha (the state itself: no wind-up).
        gm_bounds, gm_momentum: clip of GM's ``a`` and its momentum ``mu``.
        beta_sl, sl_bounds: hyper-LR of SL and the clip of lambda (a factor on the client LR).
        sl_state_clip: clip lambda itself (canonical). False: unclipped accumulator ``A``,
            ``lambda = clip(1 + A)`` (the reference; winds up).
        trainable: the names of the arrays that enter inner products and are LR-scaled (the
            model's parameters); the others take ``1.0 * delta``. None: every array.

    Example:
        >>> import numpy as np
        >>> from fedsim.core.transforms import RoundInfo
        >>> opt = fedhyper_server("sl", beta_sl=10.0)
        >>> x = {"w": np.zeros(1)}
        >>> s = opt.init(x)
        >>> for _ in range(2):
        ...     _, s = opt.update({"w": np.array([0.1])}, s, x, RoundInfo(1))
        >>> opt.downlink(s)   # lambda = 1 + 10 * 0.01
        {'lr_scale': 1.1}

    References:
        arXiv:2310.03156 (FedHyper), spec ``specs/fedhyper.md`` section 2.2.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown FedHyper variant '{variant}' (known: {', '.join(VARIANTS)})")
    if variant in ("g", "g+cl"):
        core = _g(float(alpha0), float(beta_g), _bounds("alpha_bounds", alpha_bounds))
    elif variant in ("gm", "gm+cl"):
        core = _gm(float(alpha0), float(beta_g), _bounds("gm_bounds", gm_bounds), float(gm_momentum))
    elif variant == "sl":
        core = _sl(float(alpha0), float(beta_sl), _bounds("sl_bounds", sl_bounds), bool(sl_state_clip))
    else:
        core = scale(float(alpha0))
    return _on(core, trainable)


# ---------------------------------------------------------------- baselines


def decay_server(target: str, *, alpha0: float = 1.0, rate: float = 0.995,
                 trainable: Collection[str] | None = None) -> Transform:
    """Decay-G (``alpha_t = alpha0 rate^t``) or Decay-SL (client LR factor ``rate^t``).

    Args:
        target: ``"g"`` decays the server LR; ``"sl"`` decays the client LR (the server steps at
            ``alpha0``; ``downlink`` gives ``lr_scale = rate^t`` for round ``t``, counted from 0).
        alpha0, rate: initial server LR and the per-round factor.
        trainable: as in :func:`fedhyper_server`.

    Example:
        >>> import numpy as np
        >>> from fedsim.core.transforms import RoundInfo
        >>> opt = decay_server("sl", rate=0.5)
        >>> x = {"w": np.zeros(1)}
        >>> _, s = opt.update({"w": np.ones(1)}, opt.init(x), x, RoundInfo(1))
        >>> opt.downlink(s)   # round 1 gets half the base LR
        {'lr_scale': 0.5}
    """
    if target not in ("g", "sl"):
        raise ValueError(f"decay target must be 'g' or 'sl', got '{target}'")
    alpha0, rate = float(alpha0), float(rate)

    def update(d, state, params, info):
        t = float(state["round"])
        alpha = alpha0 * rate ** t if target == "g" else alpha0
        return _scaled(alpha, d), {"alpha": alpha, "round": state["round"] + 1}

    def downlink(state):
        return {"lr_scale": rate ** float(state["round"])} if target == "sl" else {}

    return _on(Transform(lambda params: {"alpha": alpha0, "round": 0}, update,
                         report=lambda s: {"lr_global": s["alpha"]}, downlink=downlink), trainable)


def fedexp_lr(params: Mapping[str, np.ndarray], client_params: Sequence[Mapping[str, np.ndarray]],
              delta: Mapping[str, np.ndarray], *, eps: float = 1e-3) -> float:
    """FedExp's server LR ``max(1, mean_m ||Delta_m||^2 / (2 (||Delta||^2 + eps)))``.

    The mean is over the ``|S_t|`` clients that replied; norms are over ``delta``'s arrays, float64.

    Example:
        >>> import numpy as np
        >>> x = {"w": np.zeros(1)}
        >>> fedexp_lr(x, [{"w": np.array([1.0])}, {"w": np.array([-1.0])}], {"w": np.zeros(1)})   # 1 / (2 * 1e-3)
        500.0
    """
    if not client_params:
        raise ValueError("fedexp_lr needs at least one client")
    x = float64({k: params[k] for k in delta})
    sq = [inner(dm, dm) for dm in ({k: np.asarray(c[k], np.float64) - x[k] for k in x} for c in client_params)]
    return max(1.0, float(np.mean(sq)) / (2.0 * (inner(delta, delta) + eps)))


def fedexp_server(*, eps: float = 1e-3, trainable: Collection[str] | None = None) -> Transform:
    """FedExp as a transform: the LR is :func:`fedexp_lr` of the round's replies (``info.client_params``)."""
    def update(d, state, params, info):
        if not info.client_params:
            raise ValueError("fedexp needs the round's replies (RoundInfo.client_params)")
        alpha = fedexp_lr(params, info.client_params, d, eps=eps)
        return _scaled(alpha, d), {"alpha": alpha}

    return _on(Transform(lambda params: {"alpha": 1.0}, update, report=lambda s: {"lr_global": s["alpha"]}),
               trainable)
