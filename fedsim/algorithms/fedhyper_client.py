"""FedHyper-CL: the client-side hypergradient LR rule, as a small wrapper for any torch loop.

Per round a client gets ``x_t``, the base LR and the previous raw global update
``Delta_{t-1}``. It starts with ``b = 1`` and ``delta_prev = Delta_{t-1}``; after every real
optimizer step with ``lr = base_lr * b`` it records ``delta = theta_after - theta_before`` and,
except on the first minibatch of each epoch, sets

    h = beta_l <delta, delta_prev> + beta_lg <delta, Delta_{t-1}>,
    b <- clip(b * min(rho, 1 + h), b_min, b_max),    delta_prev <- delta.

``b`` and ``delta_prev`` live for one round only (make a new object per round); nothing here is
persisted or sent, except the round metrics (:meth:`FedHyperClient.metrics`). :class:`ClientLR` is
the rule as a fedsim client plugin (it receives ``Delta_{t-1}`` from
:class:`fedsim.algorithms.fedhyper.PreviousUpdate`).

theta_before is snapshotted internally: at construction (so build the object after loading
``x_t`` into the model) and at the end of every real :meth:`FedHyperClient.after_step`. Call
:meth:`FedHyperClient.before_step` only if parameters change between steps by other means
than the optimizer. Construction counts as the start of an epoch; :meth:`start_epoch` marks
the others (calling it before the first epoch too is harmless).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> params = list(model.parameters())
    >>> cl = FedHyperClient(0.1, None, params, beta_l=1.0, beta_lg=0.01)
    >>> opt = torch.optim.SGD(params, lr=cl.lr)
    >>> x, y = torch.ones(4, 2), torch.zeros(4, 1)
    >>> for epoch in range(2):
    ...     cl.start_epoch()
    ...     for _ in range(3):
    ...         opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
    ...         cl.after_step(opt)
    >>> cl.steps, 0.1 <= cl.b <= 10.0, opt.param_groups[0]["lr"] == cl.lr
    (6, True, True)

References:
    Z. Wang, J. Wang, A. Li. FedHyper, arXiv:2310.03156 (ICLR 2024); spec ``specs/fedhyper.md``
    section 2.3 (the reference code's multiplicative CL rule).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from fedsim.core.arrays import Named
from fedsim.core.client import ClientPlugin, ClientResult, ClientRound, LocalRun
from fedsim.core.server import Payload


def auto_beta_lg(clients_per_round: int) -> float:
    """``beta_lg = 0.1 / (N * C)``, with ``N * C`` the configured clients per round (0.01 for 10).

    Example:
        >>> auto_beta_lg(10)
        0.01
    """
    if int(clients_per_round) < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
    return 0.1 / int(clients_per_round)


def _inner(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor] | None) -> float:
    """``<u, v>`` over all tensors jointly, float64, in list order; 0 when ``v`` is None."""
    if v is None:
        return 0.0
    acc = torch.zeros((), dtype=torch.float64, device=u[0].device if u else "cpu")
    for a, b in zip(u, v):
        acc = acc + torch.sum(a.to(torch.float64) * b.to(acc.device, torch.float64))
    return float(acc)


class FedHyperClient:
    """Client LR scheduler CL for one round of local training.

    Args:
        base_lr: the round's base LR ``eta_base`` (``eta_0``, or SL's ``lambda * eta_0``).
        prev_global_update: ``Delta_{t-1}`` over the trainable parameters (same order and
            shapes as ``params``); None (round 0) counts as zeros.
        params: the trainable parameters the optimizer updates.
        beta_l: hyper-LR of the local term ``<delta, delta_prev>``.
        beta_lg: hyper-LR of the global term ``<delta, Delta_{t-1}>``; ``"auto"`` resolves to
            :func:`auto_beta_lg` of ``clients_per_round``.
        factor_cap: ``rho``, the largest growth factor of ``b`` per step.
        bounds: ``(b_min, b_max)``.
        clients_per_round: only for ``beta_lg="auto"``.

    Attributes:
        b: the current LR factor; ``lr == base_lr * b``.
        steps: real (non-skipped) optimizer steps seen.
        updates: steps that applied a hypergradient (every real step but the first of each epoch).
        hypergrad_skipped: steps whose hypergradient was non-finite (``b`` left unchanged).
    """

    def __init__(self, base_lr: float, prev_global_update: Sequence[torch.Tensor] | None,
                 params: Sequence[torch.Tensor], *, beta_l: float = 1.0, beta_lg: float | str = "auto",
                 factor_cap: float = 1.1, bounds: Sequence[float] = (0.1, 10.0),
                 clients_per_round: int | None = None) -> None:
        self.params = list(params)
        self._global = self._check_global(prev_global_update)
        if beta_lg == "auto":
            if clients_per_round is None:
                raise ValueError("beta_lg='auto' needs clients_per_round")
            beta_lg = auto_beta_lg(clients_per_round)
        lo, hi = float(bounds[0]), float(bounds[1])
        if not (0.0 <= lo <= hi and math.isfinite(hi)) or not factor_cap > 0:
            raise ValueError(f"need 0 <= b_min <= b_max < inf and factor_cap > 0, got {bounds}, {factor_cap}")
        self.base_lr, self.beta_l, self.beta_lg = float(base_lr), float(beta_l), float(beta_lg)
        self.factor_cap, self.bounds = float(factor_cap), (lo, hi)
        self.b, self.steps, self.updates, self.hypergrad_skipped = 1.0, 0, 0, 0
        self._delta_prev: list[torch.Tensor] | None = self._global
        self._first = True
        self.before_step()

    def _check_global(self, g: Sequence[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if g is None:
            return None
        g = [torch.as_tensor(t) for t in g]
        shapes = [tuple(t.shape) for t in g]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"prev_global_update shapes {shapes} do not match the parameters")
        return [t.detach().to(p.device) for t, p in zip(g, self.params)]

    @property
    def lr(self) -> float:
        """The LR for the next step: ``base_lr * b``."""
        return self.base_lr * self.b

    @property
    def delta_prev(self) -> list[torch.Tensor] | None:
        """The comparison update of the next hypergradient (read-only; None = zeros)."""
        return self._delta_prev

    def set_lr(self, optimizer: Any) -> None:
        """Write :attr:`lr` into every param group (a DP optimizer forwards to the wrapped one)."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr

    def start_epoch(self) -> None:
        """Mark the next real step as the first minibatch of an epoch (it will not change ``b``)."""
        self._first = True

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot theta_before (done automatically at construction and after each real step)."""
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self, optimizer: Any = None, skipped: bool = False) -> None:
        """Record one optimizer step, update ``b`` and set the optimizer's LR to :attr:`lr`.

        Args:
            optimizer: the optimizer whose param groups get the new LR (None: only update ``b``).
            skipped: the step did not happen (e.g. an Opacus virtual step). An optimizer with
                ``_is_last_step_skipped`` set (Opacus ``DPOptimizer``) is detected too.
                A skipped step changes nothing.
        """
        if skipped or bool(getattr(optimizer, "_is_last_step_skipped", False)):
            return
        delta = [p.detach().to(torch.float64) - s.to(torch.float64) for p, s in zip(self.params, self._before)]
        self.steps += 1
        if self._first:
            self._first = False
        else:
            self._hypergrad_step(delta)
        self.before_step()
        if optimizer is not None:
            self.set_lr(optimizer)

    def _hypergrad_step(self, delta: list[torch.Tensor]) -> None:
        h = self.beta_l * _inner(delta, self._delta_prev) + self.beta_lg * _inner(delta, self._global)
        if not math.isfinite(h):
            self.hypergrad_skipped += 1
            return
        self.updates += 1
        self.b = min(max(self.b * min(self.factor_cap, 1.0 + h), self.bounds[0]), self.bounds[1])
        self._delta_prev = delta

    def metrics(self) -> dict[str, float]:
        """Round metrics for the reply: ``cl_b_final``, ``cl_steps``, ``cl_updates``, ``cl_hypergrad_skipped``."""
        return {"cl_b_final": self.b, "cl_steps": self.steps, "cl_updates": self.updates,
                "cl_hypergrad_skipped": self.hypergrad_skipped}


class _CLRound(ClientRound):
    def __init__(self, name: str, cl: FedHyperClient):
        self.name, self.cl = name, cl

    def on_epoch(self, run: LocalRun) -> None:
        self.cl.start_epoch()

    def after_step(self, run: LocalRun, skipped: bool) -> None:
        self.cl.after_step(None, skipped)
        run.lr_factors[self.name] = self.cl.b

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        return ClientResult(metrics=self.cl.metrics())


class ClientLR(ClientPlugin):
    """FedHyper-CL as a client plugin: a fresh :class:`FedHyperClient` per round, fed the previous
    global update from the downlink group ``prev_update`` (absent in the first round).

    Args:
        name: the plugin name (shared with its server side).
        beta_l, beta_lg, factor_cap, bounds: as in :class:`FedHyperClient` (``beta_lg`` resolved).
    """

    def __init__(self, name: str, *, beta_l: float, beta_lg: float, factor_cap: float,
                 bounds: Sequence[float]) -> None:
        self.name = name
        self.kwargs: dict[str, Any] = {"beta_l": beta_l, "beta_lg": beta_lg, "factor_cap": factor_cap, "bounds": tuple(bounds)}

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        params = run.trainable()
        prev = downlink.arrays.get("prev_update")
        prev_t = [torch.from_numpy(prev[k]) for k in params] if prev else None
        return _CLRound(self.name, FedHyperClient(run.base_lr, prev_t, list(params.values()), **self.kwargs))
