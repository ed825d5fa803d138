"""Local training and evaluation helpers for any torch loop: the scenario's optimizers, a one-call
training function and evaluation.

Example:
    >>> import numpy as np
    >>> from fedsim.models import build_model
    >>> model = build_model("mlp", input_shape=(4,), num_classes=2, hidden=[8])
    >>> x, y = np.random.default_rng(0).normal(size=(32, 4)).astype("float32"), np.zeros(32, dtype="int64")
    >>> out = local_train(model, x, y, epochs=1, batch_size=8, lr=0.1, generator=torch.Generator().manual_seed(0))
    >>> out["steps"], out["num_examples"]
    (4, 32)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.core.client import ClientRound, LocalRun
from fedsim.train.batches import ShuffledBatches
from fedsim.train.loop import train_local


def make_optimizer(params: Sequence[nn.Parameter], name: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer named in the scenario (``sgd`` or ``adam``) over ``params``."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (known: sgd, adam)")


def local_train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int | None = None,
                steps: int | None = None, batch_size: int = 32, optimizer: str = "sgd", lr: float = 0.05,
                momentum: float = 0.0, weight_decay: float = 0.0, generator: torch.Generator,
                device: torch.device | str = "cpu", rounds: Sequence[ClientRound] = ()) -> dict[str, float]:
    """Train ``model`` in place on one client's data with the standard loop (cross-entropy).

    Args:
        model: the model, already holding the global weights.
        x, y: the client's examples and integer labels (numpy).
        epochs, steps: how long to train (one of them; default one epoch).
        batch_size, optimizer, lr, momentum, weight_decay: local optimizer settings.
        generator: the source of the data order (derive it from seed, round and client id).
        device: where to train.
        rounds: algorithm hooks (:class:`~fedsim.core.client.ClientRound` s), e.g. FedProx's.

    Returns:
        ``train_loss`` (mean over batches), ``num_examples``, ``steps`` and ``compute_s``.
    """
    device = torch.device(device)
    run = LocalRun(model, ShuffledBatches(x, y, batch_size=batch_size, epochs=epochs, steps=steps,
                                          generator=generator, device=device),
                   lambda params, rate: make_optimizer(params, optimizer, rate, momentum, weight_decay),
                   F.cross_entropy, base_lr=lr, device=device)
    return {**train_local(run, rounds), "num_examples": int(len(y))}


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on (x, y)."""
    device = torch.device(device)
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(np.asarray(x[start:start + batch_size])).to(device)
        yb = torch.from_numpy(np.asarray(y[start:start + batch_size])).to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(len(y), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": int(len(y))}
