"""The client contract: a local run assembled from parts, and the hooks an algorithm plugs into it.

A client's round is a :class:`LocalRun`. It holds the model (with the global weights), an
optimizer factory, a batch source, a loss function and the base learning rate. The batch source
is an iterator of epochs, each an iterable of ``(x, y)`` batches, so a Poisson ``DPDataLoader`` or
a ``BatchMemoryManager`` fits. :func:`fedsim.train.run_local` drives the run with the hooks of
every algorithm active on the client. An algorithm's client side is a :class:`ClientPlugin`. Each
round it ``begin`` s a :class:`ClientRound` from the round's downlink and its saved client state.
The hooks, in the order the loop calls them (``ClientPlugin.decode_model`` comes first, before the
global model is loaded, for a model that came down sparse):

- ``prepare(run)`` before the first step: may wrap the model (``run.wrapped``, e.g. Opacus'
  ``GradSampleModule``), replace ``run.optimizer`` or ``run.batches``;
- ``on_epoch(run)`` before the first batch of every epoch;
- ``loss_term(run)``: a term added to the batch loss (FedProx's proximal term);
- ``after_backward(run)``: right after ``backward()``, before any ``before_step``: per-sample
  gradients are still unclipped (a mask on them);
- ``before_step(run)``: after ``backward()``, before ``optimizer.step()``; edits ``run.grads()``
  in place (gradient masks, SCAFFOLD's correction);
- ``after_step(run, skipped)``: after the step (FedHyper-CL's rule, re-masking). ``skipped``
  means an Opacus virtual step, which does not count as a step;
- ``procedure(run, rounds)``: optionally replaces the whole local procedure (a phase of its own);
- ``finish(run, model)``: what it adds to the reply (arrays, metrics, the model upload's wire
  form) and its client state for the next round it takes part in. Plugins finish in order;
  ``model`` is the upload as the previous plugins left it;
- ``close(run)``: always called at the end, also after an error (unwrap, free buffers).

Hooks see tensors by name: ``run.trainable()`` and ``run.grads()`` use the canonical module's
names even when ``run.wrapped`` is set. They change the learning rate only through
``run.lr_factors``, never through the optimizer's ``param_groups``. They take randomness only
from ``run.generator(purpose)``, never from a global RNG. Hooks that keep to this also fit the
functional path (``torch.func.functional_call`` + ``vmap(grad)``). That path computes per-sample
gradients and trains several clients in one pass.

``ClientPlugin.private`` names the keys of a plugin's state that must never leave the client
(DiceSGD's error buffer). ``ClientRound.private()`` does the same for what lives only during the
round. :func:`check_private` refuses a reply that carries any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from fedsim.core.arrays import Named
from fedsim.core.server import TRAIN, Payload
from fedsim.core.state import flatten
from fedsim.seeding import torch_generator

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    """An iterator of epochs, each an iterable of ``(x, y)`` batches already on the run's device."""

    def epochs(self) -> Iterator[Iterable[Batch]]:
        ...


@dataclass
class LocalRun:
    """One client's local training in one round: the parts, and where the loop is.

    Attributes:
        model: the model, holding the global weights, on ``device``. Its names are the canonical
            ones (what is uploaded); it is the same object for every client of a process.
        batches: the batch source.
        make_optimizer: ``(trainable parameters, lr) -> optimizer``.
        loss_fn: ``(model output, targets) -> scalar loss``.
        base_lr: the round's client learning rate.
        device: where training runs.
        data: the client's examples ``(x, y)`` (a DP plugin builds its own loader from them).
        seed: the run seed; :meth:`generator` derives generators from it.
        server_round, client_id, phase: who and when (from the downlink).
        basis_id: the server's parameter-basis id. It changes when the parameterisation changes
            (a re-factorisation, a new mask), and state tied to the basis is reset then.
        wrapped: a wrapper of ``model`` the loop calls instead (set in ``prepare``), or None.
        optimizer: set by the loop (or replaced in ``prepare``).
        lr_factors: per plugin, a factor on ``base_lr`` for the next step (FedHyper-CL's ``b``).
        steps: real optimizer steps taken so far (Opacus' virtual steps do not count).
    """

    model: nn.Module
    batches: BatchSource
    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    base_lr: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data: tuple[np.ndarray, np.ndarray] | None = None
    seed: int = 0
    server_round: int = 0
    client_id: int = 0
    phase: str = TRAIN
    basis_id: int = 0
    wrapped: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr_factors: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    @property
    def lr(self) -> float:
        """The learning rate of the next step: ``base_lr`` times every plugin's factor."""
        if not self.lr_factors:
            return self.base_lr
        factor = 1.0
        for f in self.lr_factors.values():
            factor *= f
        return self.base_lr * factor

    @property
    def num_examples(self) -> int:
        """``|D_k|``: how many examples the client holds."""
        return int(len(self.data[1])) if self.data is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the module being trained (the wrapper if there is one)."""
        return (self.wrapped if self.wrapped is not None else self.model)(x)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters being trained, by canonical name (``named_parameters`` order)."""
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    def grads(self) -> dict[str, torch.Tensor]:
        """The gradients the next step will apply, by canonical name (hooks edit them in place).

        A functional loop (``vmap`` over clients or samples) overrides this to hand the hooks its
        own gradient tensors; hooks that touch gradients only through it run in both loops.
        """
        return {k: p.grad for k, p in self.trainable().items() if p.grad is not None}

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator for ``purpose``, a pure function of (seed, purpose, round, client)."""
        return torch_generator(self.seed, purpose, self.server_round, self.client_id)


@dataclass
class ClientResult:
    """What a plugin contributes to the reply, and its state for the next round.

    Attributes:
        metrics: finite numbers for the reply (they reach ``clients.jsonl`` and ``metrics.jsonl``).
        arrays: this plugin's array groups for the reply (``{"delta_c": {...}}``).
        state: the plugin's client state to keep (None: keep nothing).
        model: the model upload's wire form, if this plugin changes it. That is a subset of the
            arrays, only the kept entries of a mask, or ``{}`` for no model at all. None leaves it
            as it is.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, Named] = field(default_factory=dict)
    state: Any = None
    model: Named | None = None


class ClientRound:
    """One round of a plugin on one client. Every hook is a no-op by default."""

    def prepare(self, run: LocalRun) -> None:
        """Before the first step (``run.optimizer`` exists); may wrap the model, replace the parts."""

    def on_epoch(self, run: LocalRun) -> None:
        """Before the first batch of every epoch."""

    def loss_term(self, run: LocalRun) -> torch.Tensor | None:
        """A term added to this batch's loss (None: nothing)."""
        return None

    def after_backward(self, run: LocalRun) -> None:
        """Right after ``backward()``, before every plugin's ``before_step``: Opacus' per-sample
        gradients (``p.grad_sample``) are not clipped yet (AutoFLIP masks them here)."""

    def before_step(self, run: LocalRun) -> None:
        """After ``backward()``, before ``optimizer.step()``: edit ``run.grads()`` in place."""

    def after_step(self, run: LocalRun, skipped: bool) -> None:
        """After ``optimizer.step()``; ``skipped``: the step did not happen (an Opacus virtual step)."""

    def procedure(self, run: LocalRun, rounds: Sequence["ClientRound"]) -> dict[str, float] | None:
        """Run the whole local procedure instead of the standard loop (None: use the standard loop)."""
        return None

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        """After training: reply contributions and the state to keep. ``model`` is the upload so far."""
        return ClientResult()

    def private(self) -> Mapping[str, Any]:
        """What lives only during this round and must never leave the client (e.g. an error buffer
        that is reset every round); checked against the reply like ``ClientPlugin.private``."""
        return {}

    def close(self, run: LocalRun) -> None:
        """Always called at the end of the round, also after an error: undo what ``prepare`` did
        to shared objects (the model is reused by the next client of this process)."""


class ClientPlugin:
    """The client side of an algorithm: a factory of :class:`ClientRound` s.

    Attributes:
        name: equal to its server side's name (it receives that plugin's downlink).
        private: keys of this plugin's client state that must never leave the client.
        stateful: whether it keeps client state across rounds (resume needs that state).
        keep_on_resume: the keys of its (dict) state that must never roll back, e.g. a privacy
            ledger (steps taken after the checkpoint were spent): resume keeps their current values
            and takes the rest from the checkpoint's snapshot, so that algorithm state such as
            DiceSGD's error feedback is the checkpoint's (the run then continues as it would have).
    """

    name: str = ""
    private: frozenset[str] = frozenset()
    stateful: bool = False
    keep_on_resume: frozenset[str] = frozenset()

    def takes_part(self, phase: str) -> bool:
        """Whether this plugin runs in rounds of ``phase`` (default: ordinary training rounds)."""
        return phase == TRAIN

    def decode_model(self, model: Named, downlink: Payload, state: Any) -> Named:
        """The dense global model from what came down (the server's ``downlink_model``): e.g. the
        kept entries of a mask scattered back. Called before the model is loaded; default: as is."""
        return model

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        """Start this plugin's round. ``downlink`` is its part of the message, ``state`` what its
        last round kept (None the first time this client takes part)."""
        return ClientRound()


class PrivateDataError(RuntimeError):
    """A reply would have carried data a plugin declared private."""


def _secrets(plugin: ClientPlugin, state: Any, round_private: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    kept = {k: v for k, v in (state or {}).items() if k in plugin.private} if isinstance(state, Mapping) else {}
    out = []
    for label, tree in (("state", kept), ("round", dict(round_private))):
        arrays, _ = flatten(tree)
        out += [(f"{label} '{path}'", a) for path, a in arrays.items()]
    return out


def check_private(plugin: ClientPlugin, state: Any, round_private: Mapping[str, Any],
                  outgoing: Mapping[str, np.ndarray], names: Iterable[str]) -> None:
    """Refuse a reply that names a private entry, or carries one (as is, cast or reshaped).

    Args:
        plugin: the plugin whose secrets are checked.
        state: the state it keeps (its ``private`` keys are secret).
        round_private: what its round declared private (``ClientRound.private()``).
        outgoing: every array of the reply, by where it travels (``"<record>/<name>"``).
        names: every record, array and metric name in the reply.

    A copy of a secret inside a larger array is not found here; the privacy audits scan the
    serialized messages for that.

    Example:
        >>> p = ClientPlugin(); p.name, p.private = "dice", frozenset({"error"})
        >>> e = {"w": np.arange(1.0, 5.0)}
        >>> check_private(p, {"error": e}, {}, {"dice.up/x": e["w"].astype(np.float32).reshape(2, 2)}, [])
        Traceback (most recent call last):
        ...
        fedsim.core.client.PrivateDataError: plugin 'dice' would send its private state 'error/w' (in 'dice.up/x')
    """
    keys = set(plugin.private) | set(round_private)
    for name in sorted(keys & set(names)):
        raise PrivateDataError(f"plugin '{plugin.name}' would send an entry named after its private data '{name}'")
    for label, secret in _secrets(plugin, state, round_private):
        if secret.size == 0 or not np.any(secret):
            continue                                    # zeros (a reset buffer) carry nothing
        flat = secret.ravel().astype(np.float32)
        for where, arr in outgoing.items():
            if arr.size == secret.size and np.array_equal(arr.ravel().astype(np.float32), flat):
                raise PrivateDataError(f"plugin '{plugin.name}' would send its private {label} (in '{where}')")
