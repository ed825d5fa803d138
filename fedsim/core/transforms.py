"""Server optimizers as small optax-style transforms over named arrays, chained and masked.

A :class:`Transform` turns the round's aggregate update ``delta`` (the raw weighted mean of the
client updates, float64) into the step the server applies: ``update(updates, state, params,
info) -> (updates, state)``. Transforms compose with :func:`chain` (each one's output is the
next one's input) and :func:`masked` (apply a transform to some arrays only; the others pass
through unchanged, so buffers keep FedAvg's ``1.0 * delta``). State is a plain tree of floats,
ints and named arrays: :mod:`fedsim.core.state` checkpoints it.

Two read-outs go beyond optax: ``report(state)`` gives metrics of the last step (``lr_global``)
and ``downlink(state)`` gives scalars the next round's clients need (``lr_scale``, a factor on
the client learning rate).

Example:
    >>> import numpy as np
    >>> opt = chain(trace(0.5), scale(2.0))                 # FedAvgM: m <- 0.5 m + delta; x += 2 m
    >>> x = {"w": np.zeros(1, np.float32)}
    >>> s = opt.init(x)
    >>> for _ in range(2):
    ...     step, s = opt.update({"w": np.ones(1)}, s, x, RoundInfo(1))
    ...     x = apply_updates(x, step)
    >>> x["w"].tolist(), opt.report(s)
    ([5.0], {'lr_global': 2.0})

References:
    optax (DeepMind): composable gradient transformations. FedAvgM: Hsu et al., arXiv:1909.06335.
    FedAdam: Reddi et al., Adaptive Federated Optimization, arXiv:2003.00295.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from fedsim.core.arrays import Named, apply_updates, select

__all__ = ["RoundInfo", "Transform", "adam", "apply_updates", "chain", "identity", "masked", "scale", "trace",
           "zero_masked"]


@dataclass(frozen=True)
class RoundInfo:
    """What a transform may read about the round besides the aggregate update.

    Attributes:
        server_round: the round being aggregated (1-based).
        client_params: the accepted replies' new arrays, in client-id order (FedExp reads them).
        weights: the aggregation weights of those replies (before normalisation).
        mask: per array name, a bool array whose False entries must stay exactly 0 (pruning);
            transforms with state keep their state 0 there too. None: no mask.
    """

    server_round: int
    client_params: Sequence[Mapping[str, np.ndarray]] = ()
    weights: Sequence[float] = ()
    mask: Mapping[str, np.ndarray] | None = None

    def restrict(self, names: Collection[str]) -> "RoundInfo":
        """The same round, seeing only the arrays in ``names``."""
        mask = select(self.mask, names) if self.mask is not None else None
        return RoundInfo(self.server_round, [select(c, names) for c in self.client_params], self.weights, mask)


def zero_masked(arrays: Named, mask: Mapping[str, np.ndarray] | None) -> Named:
    """``arrays`` with the entries ``mask`` prunes set to exactly 0 (unchanged without a mask)."""
    if mask is None:
        return arrays
    return {k: np.where(mask[k], v, 0.0) if k in mask else v for k, v in arrays.items()}


def _none(state: Any) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Transform:
    """A pure server-side transformation of the aggregate update.

    Attributes:
        init: ``params -> state``.
        update: ``(updates, state, params, info) -> (updates, state)``; never mutates its inputs.
        report: ``state -> metrics`` of the last step (e.g. ``{"lr_global": 1.0}``).
        downlink: ``state -> scalars`` for the next round's clients (e.g. ``{"lr_scale": 0.5}``).
    """

    init: Callable[[Named], Any]
    update: Callable[[Named, Any, Named, RoundInfo], tuple[Named, Any]]
    report: Callable[[Any], dict[str, float]] = field(default=_none)
    downlink: Callable[[Any], dict[str, float]] = field(default=_none)


def identity() -> Transform:
    """The update unchanged: FedAvg at server LR 1."""
    return Transform(lambda params: None, lambda updates, state, params, info: (dict(updates), state))


def scale(lr: float) -> Transform:
    """``updates * lr``; reports ``lr_global = lr`` (FedAvg with a server learning rate)."""
    lr = float(lr)
    return Transform(lambda params: None,
                     lambda updates, state, params, info: ({k: lr * d for k, d in updates.items()}, state),
                     report=lambda state: {"lr_global": lr})


def trace(momentum: float) -> Transform:
    """Server momentum: ``m <- momentum * m + updates``; outputs ``m`` (FedAvgM's buffer, float64)."""
    mu = float(momentum)

    def init(params: Named) -> Named:
        return {k: np.zeros(p.shape, np.float64) for k, p in params.items()}

    def update(updates, state, params, info):
        m = zero_masked({k: mu * state[k] + d for k, d in updates.items()}, info.mask)
        return dict(m), m

    return Transform(init, update)


def adam(lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> Transform:
    """FedAdam (Reddi et al.): Adam moments of the pseudo-gradient ``-delta``, no bias correction,
    step ``lr * m / (sqrt(v) + tau)``; reports ``lr_global = lr``."""
    lr, b1, b2, tau = float(lr), float(beta_1), float(beta_2), float(tau)

    def init(params: Named) -> dict:
        return {"m": {k: np.zeros(p.shape, np.float64) for k, p in params.items()},
                "v": {k: np.zeros(p.shape, np.float64) for k, p in params.items()}}

    def update(updates, state, params, info):
        m = zero_masked({k: b1 * state["m"][k] + (1 - b1) * d for k, d in updates.items()}, info.mask)
        v = zero_masked({k: b2 * state["v"][k] + (1 - b2) * d * d for k, d in updates.items()}, info.mask)
        return {k: lr * m[k] / (np.sqrt(v[k]) + tau) for k in updates}, {"m": m, "v": v}

    return Transform(init, update, report=lambda state: {"lr_global": lr})


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state is the list of their states, read-outs are merged
    (a later transform's key wins)."""
    ts = list(transforms)

    def update(updates, state, params, info):
        new_state = []
        for t, s in zip(ts, state):
            updates, s = t.update(updates, s, params, info)
            new_state.append(s)
        return updates, new_state

    def merged(attr: str) -> Callable[[Any], dict[str, float]]:
        def read(state):
            out: dict[str, float] = {}
            for t, s in zip(ts, state):
                out.update(getattr(t, attr)(s))
            return out
        return read

    return Transform(lambda params: [t.init(params) for t in ts], update, merged("report"), merged("downlink"))


def masked(inner: Transform, names: Collection[str]) -> Transform:
    """Apply ``inner`` to the arrays in ``names`` only; the others pass through unchanged.

    The mask is fixed when the transform is built (e.g. the model's trainable parameters), so
    no closure inside ``inner`` needs to know it.
    """
    keep = frozenset(names)

    def update(updates, state, params, info):
        sub, state = inner.update(select(updates, keep), state, select(params, keep), info.restrict(keep))
        return {k: sub[k] if k in keep else d for k, d in updates.items()}, state

    def init(params: Named) -> Any:
        missing = sorted(keep - set(params))
        if missing:
            raise ValueError(f"masked: {missing} are not among the arrays {list(params)}")
        return inner.init(select(params, keep))

    return Transform(init, update, inner.report, inner.downlink)
