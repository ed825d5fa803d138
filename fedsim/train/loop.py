"""The standard local training loop: a :class:`~fedsim.core.client.LocalRun` driven with the hooks
of every algorithm active on the client.

Per batch: ``zero_grad``; ``loss = loss_fn(run.forward(x), y)`` plus every hook's ``loss_term``;
``backward``; ``after_backward`` hooks; ``before_step`` hooks; ``optimizer.step()``; ``after_step``
hooks (told whether the step was an Opacus virtual step, which is not a step); then the learning
rate of the next step is ``run.lr`` (``base_lr`` times the hooks' factors), written into the
optimizer's param groups here and nowhere else.

Example:
    >>> import numpy as np, torch
    >>> from fedsim.core.client import LocalRun
    >>> from fedsim.train.batches import ShuffledBatches
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = np.ones((8, 3), "float32"), np.zeros(8, "int64")
    >>> run = LocalRun(model, ShuffledBatches(x, y, batch_size=4, epochs=2, generator=torch.Generator().manual_seed(0)),
    ...                lambda params, lr: torch.optim.SGD(params, lr=lr), torch.nn.functional.cross_entropy, base_lr=0.1)
    >>> out = train_local(run)
    >>> out["steps"], run.steps
    (4, 4)
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from fedsim.core.client import ClientRound, LocalRun


def train_local(run: LocalRun, rounds: Sequence[ClientRound] = ()) -> dict[str, float]:
    """Train ``run.model`` in place with the standard loop and the hooks of ``rounds``.

    Returns:
        ``train_loss`` (mean over batches, including the hooks' loss terms), ``steps`` (real
        optimizer steps) and ``compute_s``.
    """
    start = time.perf_counter()
    run.model.to(run.device).train()
    if run.optimizer is None:
        run.optimizer = run.make_optimizer(list(run.trainable().values()), run.lr)
    lr = run.lr
    for r in rounds:
        r.prepare(run)
    if run.wrapped is not None:
        run.wrapped.train()
    if run.lr != lr:                                  # a plugin scaled the learning rate in prepare
        lr = run.lr
        for group in run.optimizer.param_groups:
            group["lr"] = lr
    total, count = 0.0, 0
    for epoch in run.batches.epochs():
        first = True
        for xb, yb in epoch:
            if first:
                for r in rounds:
                    r.on_epoch(run)
                first = False
            opt = run.optimizer
            opt.zero_grad(set_to_none=True)
            loss = run.loss_fn(run.forward(xb), yb)
            for r in rounds:
                term = r.loss_term(run)
                if term is not None:
                    loss = loss + term
            loss.backward()
            for r in rounds:
                r.after_backward(run)
            for r in rounds:
                r.before_step(run)
            opt.step()
            skipped = bool(getattr(opt, "_is_last_step_skipped", False))
            run.steps += not skipped
            for r in rounds:
                r.after_step(run, skipped)
            if run.lr != lr:
                lr = run.lr
                for group in opt.param_groups:
                    group["lr"] = lr
            total += float(loss.detach())
            count += 1
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return {"train_loss": total / max(count, 1), "steps": run.steps, "compute_s": time.perf_counter() - start}


def run_local(run: LocalRun, rounds: Sequence[ClientRound] = ()) -> dict[str, float]:
    """The client's local procedure: a plugin's own (a phase of its own), else :func:`train_local`."""
    for r in rounds:
        out = r.procedure(run, rounds)
        if out is not None:
            return out
    return train_local(run, rounds)
