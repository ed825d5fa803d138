"""FedHyper: hypergradient learning-rate schedulers for federated learning (pure cores).

This module gathers the public API:

- server schedulers G, GM, SL and CL's server part: :func:`fedhyper_server`
  (in :mod:`fedsim.algorithms.fedhyper_server`), with :func:`previous_update`,
  :func:`state_to_arrays` and :func:`state_from_arrays`;
- the client rule CL: :class:`FedHyperClient` and :func:`auto_beta_lg`
  (in :mod:`fedsim.algorithms.fedhyper_client`);
- the baselines Decay-G, Decay-SL and FedExp: :func:`decay_server`, :func:`fedexp_server`,
  :func:`fedexp_lr`;
- the settings: :func:`canonical_defaults`, :func:`reference_preset`, :func:`server_kwargs`,
  :func:`client_kwargs`.

Example:
    >>> import numpy as np
    >>> from fedsim.algorithms.aggregate import mean_update
    >>> opt = fedhyper_server("gm+cl")
    >>> x = [np.zeros(3, np.float32)]
    >>> state = opt.init(x)
    >>> d = mean_update(x, [[np.ones(3, np.float32)], [np.full(3, 3, np.float32)]], [1, 1])
    >>> x, state = opt.update(x, d, state)
    >>> x[0].tolist(), previous_update(state)[0].tolist(), opt.global_lr(state)
    ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0], 1.0)

References:
    Z. Wang, J. Wang, A. Li. FedHyper: A Universal and Robust Learning Rate Scheduler for
    Federated Learning with Hypergradient Descent. arXiv:2310.03156 (ICLR 2024).
    FedExp: Jhunjhunwala, Wang, Joshi, arXiv:2301.09604 (ICLR 2023).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fedsim.algorithms.fedhyper_client import FedHyperClient, auto_beta_lg
from fedsim.algorithms.fedhyper_server import (
    VARIANTS, FedHyperServer, HyperState, _base_state, _scalar, _select, _step, fedhyper_server, inner,
    previous_update, state_from_arrays, state_to_arrays, trainable_mask)

# ---------------------------------------------------------------- baselines


def decay_server(target: str, *, alpha0: float = 1.0, rate: float = 0.995,
                 trainable: Sequence[bool] | None = None) -> FedHyperServer:
    """Decay-G (``alpha_t = alpha0 rate^t``) or Decay-SL (client LR factor ``rate^t``).

    Args:
        target: ``"g"`` decays the server LR; ``"sl"`` decays the client LR (the server steps
            at ``alpha0``; send ``base_lr * local_lr_scale(state)`` to clients every round).
        alpha0, rate: initial server LR and the per-round factor.
        trainable: per-array mask as in :func:`fedhyper_server`.

    Example:
        >>> opt = decay_server("sl", rate=0.5)
        >>> x = [np.zeros(1)]; s = opt.init(x)
        >>> x, s = opt.update(x, [np.ones(1)], s)
        >>> opt.local_lr_scale(s)   # round 1 gets half the base LR
        0.5
    """
    if target not in ("g", "sl"):
        raise ValueError(f"decay target must be 'g' or 'sl', got '{target}'")

    def update(params, delta, state):
        if delta is None:
            return list(params), state
        mask = trainable_mask(params, trainable)
        t = float(state["round"])
        alpha = alpha0 * rate ** t if target == "g" else alpha0
        new = {**state, "alpha": _scalar(alpha), "round": _scalar(t + 1.0)}
        return _step(params, delta, mask, [alpha * d for d in _select(delta, mask)]), new

    def scale(state):
        return rate ** float(state["round"]) if target == "sl" else 1.0

    return FedHyperServer(f"decay-{target}", lambda params: _base_state(alpha=alpha0), update,
                          lambda s: float(s["alpha"]), scale)


def fedexp_lr(params: Sequence[np.ndarray], client_params: Sequence[Sequence[np.ndarray]],
              delta: Sequence[np.ndarray], *, eps: float = 1e-3, trainable: Sequence[bool] | None = None) -> float:
    """FedExp's server LR ``max(1, mean_m ||Delta_m||^2 / (2 (||Delta||^2 + eps)))``.

    The mean is over the ``|S_t|`` clients that replied; norms are over trainable arrays, float64.

    Example:
        >>> x = [np.zeros(1)]
        >>> fedexp_lr(x, [[np.array([1.0])], [np.array([-1.0])]], [np.zeros(1)])   # 1 / (2 * 1e-3)
        500.0
    """
    if not client_params:
        raise ValueError("fedexp_lr needs at least one client")
    mask = trainable_mask(params, trainable)
    x = _select(params, mask)
    sq = [inner(dm, dm) for dm in ([c - xi for c, xi in zip(_select(cp, mask), x)] for cp in client_params)]
    d = _select(delta, mask)
    return max(1.0, float(np.mean(sq)) / (2.0 * (inner(d, d) + eps)))


def fedexp_server(*, eps: float = 1e-3, trainable: Sequence[bool] | None = None) -> FedHyperServer:
    """FedExp as a server optimizer: ``update(params, delta, state, client_params=...)``.

    ``client_params`` are the replies' new weights (as given to ``mean_update``); the LR is
    :func:`fedexp_lr` and applies to trainable arrays only.
    """
    def update(params, delta, state, client_params=None):
        if delta is None:
            return list(params), state
        if client_params is None:
            raise TypeError("fedexp update needs client_params=[the replies' weights]")
        mask = trainable_mask(params, trainable)
        alpha = fedexp_lr(params, client_params, delta, eps=eps, trainable=trainable)
        new = {**state, "alpha": _scalar(alpha), "round": _scalar(float(state["round"]) + 1.0)}
        return _step(params, delta, mask, [alpha * d for d in _select(delta, mask)]), new

    return FedHyperServer("fedexp", lambda params: _base_state(alpha=1.0), update,
                          lambda s: float(s["alpha"]), lambda s: 1.0)


# ---------------------------------------------------------------- settings

_SERVER_KEYS = ("alpha0", "beta_g", "alpha_bounds", "gm_bounds", "gm_momentum", "beta_sl", "sl_bounds",
                "sl_state_clip")


def canonical_defaults() -> dict[str, Any]:
    """The canonical settings (spec section 2.6, left column)."""
    return {"variant": "g+cl", "alpha0": 1.0, "beta_g": 1.0, "alpha_bounds": (0.2, 5.0),
            "gm_bounds": (-0.2, 4.0), "gm_momentum": 0.9, "beta_sl": 1.0, "sl_bounds": (0.1, 10.0),
            "sl_state_clip": True, "beta_l": 1.0, "beta_lg": "auto", "cl_factor_cap": 1.1,
            "cl_bounds": (0.1, 10.0), "weighting": "num_examples"}


def reference_preset() -> dict[str, Any]:
    """``preset: reference`` (spec section 2.6, right column): the reference code's settings.

    ``variant`` is not set (the code's default is ``gm``, its "FULL" is ``gm+cl``). ``local``
    holds the client optimizer settings (for ``federation.local``): Adam, lr 0.01, no decay.

    Example:
        >>> p = reference_preset()
        >>> p["weighting"], p["sl_state_clip"], p["local"]["optimizer"]
        ('uniform', False, 'adam')
    """
    preset = canonical_defaults()
    del preset["variant"]
    preset.update(sl_state_clip=False, weighting="uniform",
                  local={"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0})
    return preset


def server_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`fedhyper_server` keywords among ``settings`` (spec key names)."""
    return {k: settings[k] for k in _SERVER_KEYS if k in settings}


def client_kwargs(settings: Mapping[str, Any], clients_per_round: int) -> dict[str, Any]:
    """:class:`FedHyperClient` keywords from spec-named ``settings`` (``beta_lg: auto`` resolved)."""
    names = {"beta_l": "beta_l", "beta_lg": "beta_lg", "cl_factor_cap": "factor_cap", "cl_bounds": "bounds"}
    out = {new: settings[old] for old, new in names.items() if old in settings}
    if out.get("beta_lg", "auto") == "auto":
        out["beta_lg"] = auto_beta_lg(clients_per_round)
    return out


__all__ = ["VARIANTS", "FedHyperClient", "FedHyperServer", "HyperState", "auto_beta_lg", "canonical_defaults",
           "client_kwargs", "decay_server", "fedexp_lr", "fedexp_server", "fedhyper_server", "inner",
           "previous_update", "reference_preset", "server_kwargs", "state_from_arrays",
           "state_to_arrays", "trainable_mask"]
