"""The client contract: a local run assembled from parts, and the hooks an algorithm plugs into it.

A client's round is a :class:`LocalRun` — the model (holding the global weights), an optimizer
factory, a batch source (an iterator of epochs, each an iterable of ``(x, y)`` batches, so a
Poisson ``DPDataLoader`` or a ``BatchMemoryManager`` fits), a loss function and the base
learning rate — driven by :func:`fedsim.train.train_local` with the hooks of every algorithm
active on the client. An algorithm's client side is a :class:`ClientPlugin`; each round it
``begin`` s a :class:`ClientRound` from the round's downlink and its saved client state:

- ``prepare(run)`` before the first step: may replace ``run.optimizer``, ``run.model`` or
  ``run.batches`` (Opacus' ``make_private``, a DP optimizer);
- ``on_epoch(run)`` before the first batch of every epoch;
- ``loss_term(run)``: a term added to the batch loss (FedProx's proximal term);
- ``before_step(run)``: after ``backward()``, before ``optimizer.step()`` (gradient masks,
  SCAFFOLD's correction);
- ``after_step(run, skipped)``: after the step (FedHyper-CL's rule, re-masking); ``skipped``
  is an Opacus virtual step, which is not a step;
- ``procedure(run, rounds)``: optionally replace the whole local procedure (a phase of its own);
- ``finish(run)``: what it adds to the reply (arrays, metrics, the model upload's wire form) and
  its client state for the next round it takes part in.

Hooks see tensors by name (``run.trainable()``) and change the learning rate only through
``run.lr_factors`` — never through the optimizer's ``param_groups`` and never by seeding a
global RNG — so the same hooks fit the functional path (``torch.func.functional_call`` +
``vmap(grad)``) used for per-sample gradients and for training several clients in one pass.

``ClientPlugin.private`` declares the keys of its state that must never leave the client
(DiceSGD's error buffer): :func:`check_private` refuses a reply that carries any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from fedsim.core.arrays import Named
from fedsim.core.server import TRAIN, Payload

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    """An iterator of epochs, each an iterable of ``(x, y)`` batches already on the run's device."""

    def epochs(self) -> Iterator[Iterable[Batch]]:
        ...


@dataclass
class LocalRun:
    """One client's local training in one round: the parts, and where the loop is.

    Attributes:
        model: the model, holding the global weights, on ``device``.
        batches: the batch source.
        make_optimizer: ``(trainable parameters, lr) -> optimizer``.
        loss_fn: ``(model output, targets) -> scalar loss``.
        base_lr: the round's client learning rate.
        device: where training runs.
        server_round, client_id, phase: who and when (from the downlink).
        basis_id: the server's parameter-basis id (it changes when the parameterisation does:
            re-factorisation, a new mask); state tied to the basis is reset when it changes.
        optimizer: set by the loop (or replaced in ``prepare``).
        lr_factors: per plugin, a factor on ``base_lr`` for the next step (FedHyper-CL's ``b``).
        steps: real optimizer steps taken so far; ``batches_seen``: batches processed.
    """

    model: nn.Module
    batches: BatchSource
    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    base_lr: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    server_round: int = 0
    client_id: int = 0
    phase: str = TRAIN
    basis_id: int = 0
    optimizer: torch.optim.Optimizer | None = None
    lr_factors: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    batches_seen: int = 0

    @property
    def lr(self) -> float:
        """The learning rate of the next step: ``base_lr`` times every plugin's factor."""
        if not self.lr_factors:
            return self.base_lr
        factor = 1.0
        for f in self.lr_factors.values():
            factor *= f
        return self.base_lr * factor

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters being trained, by name (``named_parameters`` order)."""
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}


@dataclass
class ClientResult:
    """What a plugin contributes to the reply, and its state for the next round.

    Attributes:
        metrics: finite numbers for the reply (they reach ``clients.jsonl`` and ``metrics.jsonl``).
        arrays: this plugin's array groups for the reply (``{"delta_c": {...}}``).
        state: the plugin's client state to keep (None: keep nothing).
        model: the model upload's wire form, if this plugin changes it (a subset of the arrays,
            or only the kept entries of a mask); None leaves it as it is.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, Named] = field(default_factory=dict)
    state: Any = None
    model: Named | None = None


class ClientRound:
    """One round of a plugin on one client. Every hook is a no-op by default."""

    def prepare(self, run: LocalRun) -> None:
        """Before the first step (``run.optimizer`` exists); may replace the run's parts."""

    def on_epoch(self, run: LocalRun) -> None:
        """Before the first batch of every epoch."""

    def loss_term(self, run: LocalRun) -> torch.Tensor | None:
        """A term added to this batch's loss (None: nothing)."""
        return None

    def before_step(self, run: LocalRun) -> None:
        """After ``backward()``, before ``optimizer.step()``: gradients are in ``p.grad``."""

    def after_step(self, run: LocalRun, skipped: bool) -> None:
        """After ``optimizer.step()``; ``skipped``: the step did not happen (an Opacus virtual step)."""

    def procedure(self, run: LocalRun, rounds: Sequence["ClientRound"]) -> dict[str, float] | None:
        """Run the whole local procedure instead of the standard loop (None: use the standard loop)."""
        return None

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        """After training: reply contributions and the state to keep. ``model`` is the upload so far."""
        return ClientResult()


class ClientPlugin:
    """The client side of an algorithm: a factory of :class:`ClientRound` s.

    Attributes:
        name: equal to its server side's name (it receives that plugin's downlink).
        private: keys of this plugin's client state that must never leave the client.
    """

    name: str = ""
    private: frozenset[str] = frozenset()

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        """Start this plugin's round: ``downlink`` is its part of the message, ``state`` what its
        last round kept (None the first time this client takes part)."""
        return ClientRound()


class PrivateDataError(RuntimeError):
    """A reply would have carried data its plugin declared private."""


def check_private(plugin: ClientPlugin, state: Any, result: ClientResult) -> None:
    """Refuse a reply that names or carries (byte for byte) any private entry of ``state``.

    Example:
        >>> p = ClientPlugin(); p.name, p.private = "dice", frozenset({"error"})
        >>> e = np.arange(4.0)
        >>> check_private(p, {"error": e}, ClientResult(arrays={"up": {"x": e.copy()}}))
        Traceback (most recent call last):
        ...
        fedsim.core.client.PrivateDataError: plugin 'dice' would send its private state 'error' (array 'up/x')
    """
    if not plugin.private:
        return
    named = set(result.metrics) | set(result.arrays) | {n for g in result.arrays.values() for n in g}
    for key in sorted(plugin.private & named):
        raise PrivateDataError(f"plugin '{plugin.name}' would send an entry named after its private state '{key}'")
    secret = {k: np.asarray(v) for k, v in (state or {}).items() if k in plugin.private}
    uploads = [(f"{g}/{n}", a) for g, arrays in result.arrays.items() for n, a in arrays.items()]
    uploads += [(f"model/{n}", a) for n, a in (result.model or {}).items()]
    for key, value in secret.items():
        for where, arr in uploads:
            if arr.shape == value.shape and np.array_equal(arr, value) and np.any(value):
                raise PrivateDataError(f"plugin '{plugin.name}' would send its private state '{key}' (array '{where}')")
