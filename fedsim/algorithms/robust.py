"""Byzantine-robust aggregation: coordinate-wise trimmed mean and median, Krum and multi-Krum,
and an update-norm guard.

The cores are pure numpy functions over a stack of client updates (``updates[i]`` is client
``i``'s update ``w_i - x``, any shape; a list of arrays of one shape also works), usable in any
federated loop:

- :func:`trimmed_mean`: per coordinate, drop the ``floor(trim * n)`` smallest and largest values
  and average the rest (Yin et al. 2018);
- :func:`median`: the per-coordinate median (Yin et al. 2018);
- :func:`krum` / :func:`multi_krum`: score every update by the summed squared distances to its
  ``n - f - 2`` nearest neighbours and keep the ``m`` best scored (Blanchard et al. 2017;
  multi-Krum, El Mhamdi et al. 2018); needs ``n > 2f + 2``;
- :func:`update_norms`: the L2 norm of each client's update over all its arrays.

:func:`robust_update` applies a rule to named arrays (the model), and :class:`RobustAggregation`
plugs it into fedsim's server through :meth:`~fedsim.core.server.ServerPlugin.combine`: the
round's aggregate update becomes the robust one instead of the weighted mean. The robust rules
ignore the example weights (a weight is only a client's claim; every update counts once), and they
act on the model update only: another plugin's arrays (SCAFFOLD's ``delta_c``) are aggregated by
that plugin as before.

With ``max_update_norm``, a reply whose update norm exceeds it is refused before anything
aggregates it (:meth:`~fedsim.core.server.ServerPlugin.screen`): it is rejected, not clipped (an
honest client rarely lands beyond a bound set a few times above the usual norm, and a clipped
attacker would still pull the model its way), so neither the model, nor another plugin (SCAFFOLD's
``c``, FedHyper's learning rates), nor ``federation.min_replies`` counts it. The number refused is
the round's ``update_norm_rejected`` metric and ``rejected_by_reason.update_norm``. If every reply
exceeds the bound, the round has no accepted reply and is skipped.

Example:
    >>> import numpy as np
    >>> u = np.array([[1.0, 2.0], [1.2, 1.8], [0.8, 2.2], [50.0, -40.0]])   # client 3 attacks
    >>> median(u).tolist(), trimmed_mean(u, 0.25).tolist()
    ([1.1, 1.9], [1.1, 1.9])
    >>> 3 in krum(np.vstack([u, u[:3] + 0.01]), f=1, m=5)                  # the attacker is not kept
    False

References:
    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent, NeurIPS 2017 (Krum). E. M. El Mhamdi, R. Guerraoui,
    S. Rouault, The Hidden Vulnerability of Distributed Learning in Byzantium, ICML 2018,
    arXiv:1802.07927 (multi-Krum). D. Yin, Y. Chen, K. Ramchandran, P. Bartlett,
    Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML 2018,
    arXiv:1803.01498 (coordinate-wise median and trimmed mean).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from fedsim.core.arrays import Named, is_float
from fedsim.core.server import ClientUpdate, PluginUpdate, RoundResult, ServerPlugin

#: The robust rules :func:`robust_update` knows.
RULES = ("trimmed_mean", "median", "krum")


def _stack(updates: Any) -> np.ndarray:
    """``updates`` as one float64 array ``(n, ...)`` (a list of same-shape arrays is stacked)."""
    out = np.asarray(updates, dtype=np.float64)
    if out.ndim == 0 or out.shape[0] == 0:
        raise ValueError("robust aggregation needs at least one update (a stack of shape (n, ...), n >= 1)")
    return out


def trim_count(n: int, trim: float) -> int:
    """How many values :func:`trimmed_mean` drops on each side of ``n``: ``floor(trim * n)``.

    Example:
        >>> trim_count(10, 0.2), trim_count(10, 0.1), trim_count(9, 0.1)
        (2, 1, 0)
    """
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5) (the fraction dropped on each side), got {trim}")
    return int(math.floor(trim * n + 1e-9))


def trimmed_mean(updates: Any, trim: float) -> np.ndarray:
    """The coordinate-wise trimmed mean: per coordinate, the mean of the values left after
    dropping the ``floor(trim * n)`` smallest and the as many largest.

    Args:
        updates: ``(n, ...)``: one update per client.
        trim: the fraction dropped on each side, in ``[0, 0.5)``; 0 is the plain mean.

    Returns:
        float64, the shape of one update. It does not depend on the order of the clients.

    Example:
        >>> trimmed_mean([[0.0], [1.0], [2.0], [3.0], [100.0]], 0.2).tolist()
        [2.0]
    """
    u = _stack(updates)
    k = trim_count(u.shape[0], trim)
    return np.sort(u, axis=0)[k:u.shape[0] - k].mean(axis=0)        # sorted: the same sum in any client order


def median(updates: Any) -> np.ndarray:
    """The coordinate-wise median (the mean of the two middle values for an even ``n``).

    Example:
        >>> median([[1.0, -5.0], [2.0, 0.0], [9.0, 1.0], [3.0, 2.0]]).tolist()
        [2.5, 0.5]
    """
    return np.median(_stack(updates), axis=0)


def pairwise_sq_distances(stacks: Sequence[np.ndarray]) -> np.ndarray:
    """``D[i, j] = sum over arrays of ||u_i - u_j||^2`` for ``stacks`` (one ``(n, ...)`` stack per
    array of the model), in float64; symmetric, exactly the same for any client order.

    Example:
        >>> pairwise_sq_distances([np.array([[0.0], [3.0]]), np.array([[0.0, 0.0], [4.0, 0.0]])]).tolist()
        [[0.0, 25.0], [25.0, 0.0]]
    """
    flat = [_stack(s).reshape(len(s), -1) for s in stacks]
    n = flat[0].shape[0] if flat else 0
    if any(f.shape[0] != n for f in flat):
        raise ValueError(f"every stack needs one row per client ({[f.shape[0] for f in flat]})")
    dist = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = sum(float(np.sum((f[i] - f[j]) ** 2)) for f in flat)
    return dist


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each update: the sum of its squared distances to its ``n - f - 2`` nearest
    other updates (lower is more central).

    Raises:
        ValueError: unless ``n > 2f + 2`` (Krum's condition) and ``f >= 0``.
    """
    d = np.asarray(distances, np.float64)
    n = d.shape[0]
    check_krum(n, f)
    neighbours = n - f - 2
    others = np.sort(d + np.diag(np.full(n, np.inf)), axis=1)[:, :neighbours]    # self excluded
    return others.sum(axis=1)


def check_krum(n: int, f: int) -> None:
    """Raise a ValueError unless Krum can run: ``n > 2f + 2`` updates for ``f >= 0`` attackers."""
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"f (the number of attackers assumed) must be an integer >= 0, got {f!r}")
    if n <= 2 * f + 2:
        raise ValueError(f"Krum with f={f} attackers needs n > 2f + 2 = {2 * f + 2} updates, got n={n} "
                         f"(at least {2 * f + 3}; or assume fewer attackers)")


def krum_select(distances: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """The indices of the ``m`` updates with the lowest Krum scores, best first (ties: lower index).

    ``m = 1`` is Krum; ``m > 1`` multi-Krum's selection.
    """
    n = np.asarray(distances).shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"m (updates kept) must be in [1, n={n}], got {m}")
    return np.argsort(krum_scores(distances, f), kind="stable")[:m]


def krum(updates: Any, f: int, m: int = 1) -> np.ndarray:
    """Krum's choice among ``updates`` (``(n, ...)``): the indices of the ``m`` most central ones.

    Args:
        updates: one update per client.
        f: the number of attackers assumed; needs ``n > 2f + 2``.
        m: how many to keep (1: Krum; ``n - f``: the usual multi-Krum).

    Example:
        >>> krum([[0.0], [0.1], [0.2], [-0.1], [10.0]], f=1).tolist()
        [0]
    """
    u = _stack(updates)
    return krum_select(pairwise_sq_distances([u]), f, m)


def multi_krum(updates: Any, f: int, m: int | None = None) -> np.ndarray:
    """The mean of the ``m`` updates Krum ranks best (default ``n - f``).

    Example:
        >>> multi_krum([[0.0], [0.5], [1.0], [-0.5], [10.0]], f=1).tolist()
        [0.25]
    """
    u = _stack(updates)
    keep = krum(u, f, u.shape[0] - f if m is None else m)
    return _mean_any_order(u[keep])


def _mean_any_order(u: np.ndarray) -> np.ndarray:
    """The mean over axis 0, summed in sorted order per coordinate (the same bits for any client order)."""
    return np.sort(u, axis=0).mean(axis=0)


def update_norms(params: Mapping[str, np.ndarray], clients: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """The L2 norm of each client's update ``w_i - x`` over all the float arrays it carries, in float64.

    Example:
        >>> x = {"w": np.zeros(2, np.float32), "n": np.zeros((), np.int64)}
        >>> update_norms(x, [{"w": np.array([3.0, 4.0], np.float32), "n": np.ones((), np.int64)}]).tolist()
        [5.0]
    """
    out = np.zeros(len(clients), np.float64)
    for i, client in enumerate(clients):
        total = 0.0
        for name, x in params.items():
            if is_float(x) and name in client:
                total += float(np.sum((client[name].astype(np.float64) - x.astype(np.float64)) ** 2))
        out[i] = math.sqrt(total)
    return out


def robust_update(params: Mapping[str, np.ndarray], clients: Sequence[Mapping[str, np.ndarray]], rule: str, *,
                  trim: float = 0.0, byzantine: int = 0) -> Named:
    """The robust aggregate of the clients' updates ``w_i - x`` of named arrays, in float64.

    Coordinate-wise rules act on every array separately; Krum measures distances over all float
    arrays jointly and averages the ``n - f`` best scored updates (multi-Krum). Integer arrays and
    arrays the clients did not send get a zero update (as :func:`~fedsim.core.arrays.mean_update`).

    Args:
        params: the global arrays ``x``.
        clients: each client's new arrays ``w_i`` (the same names for all).
        rule: ``trimmed_mean``, ``median`` or ``krum``.
        trim: for ``trimmed_mean``: the fraction dropped on each side.
        byzantine: for ``krum``: ``f``, the number of attackers assumed (needs ``n > 2f + 2``).

    Example:
        >>> x = {"w": np.zeros(1, np.float32)}
        >>> ws = [{"w": np.array([v], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, -90.0)]
        >>> [robust_update(x, ws, r, trim=0.2, byzantine=1)["w"].tolist() for r in RULES]
        [[2.0], [2.0], [2.5]]
    """
    if rule not in RULES:
        raise ValueError(f"unknown robust rule {rule!r}; expected one of {RULES}")
    if not clients:
        raise ValueError("robust_update needs at least one client")
    names = [k for k, x in params.items() if is_float(x) and k in clients[0]]
    stacks = {k: np.stack([c[k].astype(np.float64) - params[k].astype(np.float64) for c in clients])
              for k in names}
    if rule == "krum":
        keep = krum_select(pairwise_sq_distances([stacks[k] for k in names]), byzantine, len(clients) - byzantine)
        agg = {k: _mean_any_order(stacks[k][keep]) for k in names}
    elif rule == "median":
        agg = {k: median(stacks[k]) for k in names}
    else:
        agg = {k: trimmed_mean(stacks[k], trim) for k in names}
    return {k: agg[k] if k in agg else np.zeros(x.shape, np.float64) for k, x in params.items()}


class RobustAggregation(ServerPlugin):
    """The server plugin: a robust rule and/or a norm guard instead of the weighted mean.

    Args:
        name: the plugin's name (its metrics keep their own names).
        rule: one of :data:`RULES`, or None (the weighted mean of the replies the guard keeps).
        trim: ``trimmed_mean``'s fraction per side.
        byzantine: ``krum``'s ``f``. A round with too few accepted replies for Krum
            (``n <= 2f + 2``, e.g. after rejections) falls back to the coordinate-wise median and
            says so in the metric ``krum_fallback``.
        max_update_norm: leave out replies whose update norm exceeds it (None: no guard).

    State: the last round's counts (``update_norm_rejected``, ``krum_fallback``), reported as metrics.
    """

    def __init__(self, name: str, *, rule: str | None, trim: float = 0.0, byzantine: int = 0,
                 max_update_norm: float | None = None):
        if rule is not None and rule not in RULES:
            raise ValueError(f"unknown robust rule {rule!r}; expected one of {RULES} or None")
        if rule == "trimmed_mean":
            trim_count(1, trim)
        if rule == "krum":
            check_krum(2 * byzantine + 3, byzantine)
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        self.name, self.rule, self.trim, self.byzantine = name, rule, float(trim), int(byzantine)
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)

    def init(self, params: Named) -> dict:
        return self._counts(0, 0)

    def _counts(self, rejected: int, fallback: int) -> dict:
        out = {}
        if self.max_update_norm is not None:
            out["update_norm_rejected"] = rejected
        if self.rule == "krum":
            out["krum_fallback"] = fallback
        return out

    def screen(self, state: Any, server_round: int, params: Named,
               replies: Sequence[ClientUpdate]) -> tuple[Any, dict[int, tuple[str, str]]]:
        """The norm guard: refuse the replies whose update norm exceeds ``max_update_norm``."""
        if self.max_update_norm is None:
            return state, {}
        norms = update_norms(params, [r.model for r in replies]) if replies else []
        out = {i: ("update_norm", f"update norm {v:.4g} exceeds strategy.max_update_norm ({self.max_update_norm:g})")
               for i, v in enumerate(norms) if not v <= self.max_update_norm}
        return {**state, "update_norm_rejected": len(out)}, out

    def _rule(self, n: int) -> str | None:
        if self.rule == "krum" and n <= 2 * self.byzantine + 2:
            return "median"
        return self.rule

    def combine(self, state: Any, server_round: int, params: Named, replies: Sequence[ClientUpdate],
                weights: Sequence[float]) -> Named | None:
        rule = self._rule(len(replies))
        if rule is None:
            return None                                  # the weighted mean of the replies the guard kept
        return robust_update(params, [r.model for r in replies], rule, trim=self.trim, byzantine=self.byzantine)

    def aggregate(self, state: Any, result: RoundResult) -> PluginUpdate:
        if result.delta is None:
            return PluginUpdate(state)
        fallback = int(self._rule(len(result.replies)) != self.rule)
        return PluginUpdate(self._counts(state.get("update_norm_rejected", 0), fallback))

    def skipped(self, state: Any, result: RoundResult) -> Any:
        return self._counts(state.get("update_norm_rejected", 0), 0)

    def metrics(self, state: Any) -> dict[str, float]:
        return dict(state)


__all__ = ["RULES", "RobustAggregation", "check_krum", "krum", "krum_scores", "krum_select", "median",
           "multi_krum", "pairwise_sq_distances", "robust_update", "trim_count", "trimmed_mean", "update_norms"]
