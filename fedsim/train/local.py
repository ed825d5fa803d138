"""Local training and evaluation: plain PyTorch loops that every engine's clients call.

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

import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _batches(n: int, batch_size: int, epochs: int | None, steps: int | None,
             generator: torch.Generator) -> Iterator[tuple[bool, torch.Tensor]]:
    """(first batch of an epoch?, index batch): ``epochs`` shuffled passes, or exactly ``steps`` batches."""
    done = 0
    epoch = 0
    while (steps is not None and done < steps) or (steps is None and epoch < (epochs or 1)):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if steps is not None and done >= steps:
                return
            yield start == 0, order[start:start + batch_size]
            done += 1
        epoch += 1


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer named in the scenario (``sgd`` or ``adam``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (known: sgd, adam)")


def local_train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int | None = None,
                steps: int | None = None, batch_size: int = 32, optimizer: str = "sgd", lr: float = 0.05,
                momentum: float = 0.0, weight_decay: float = 0.0, proximal_mu: float = 0.0,
                generator: torch.Generator, device: torch.device | str = "cpu",
                on_epoch: Callable[[], None] | None = None,
                on_step: Callable[[torch.optim.Optimizer], None] | None = None) -> dict[str, float]:
    """Train ``model`` in place on one client's data.

    Args:
        model: the model, already holding the global weights.
        x, y: the client's examples and integer labels (numpy).
        epochs, steps: how long to train (one of them; default one epoch).
        batch_size, optimizer, lr, momentum, weight_decay: local optimizer settings.
        proximal_mu: FedProx proximal weight (0 disables it).
        generator: the source of the data order (derive it from seed, round and client id).
        device: where to train.
        on_epoch: called before the first step of each epoch (e.g. ``FedHyperClient.start_epoch``).
        on_step: called after each optimizer step with the optimizer (e.g. ``FedHyperClient.after_step``,
            which may change the learning rate for the next step).

    Returns:
        ``train_loss`` (mean over steps), ``num_examples``, ``steps`` and ``compute_s``.
    """
    start = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    xs, ys = torch.from_numpy(np.asarray(x)).to(device), torch.from_numpy(np.asarray(y)).to(device)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    total, count = 0.0, 0
    for first, idx in _batches(len(ys), batch_size, epochs, steps, generator):
        if first and on_epoch is not None:
            on_epoch()
        idx = idx.to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss = loss + 0.5 * proximal_mu * prox
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(opt)
        total += float(loss.detach())
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"train_loss": total / max(count, 1), "num_examples": int(len(ys)), "steps": count,
            "compute_s": time.perf_counter() - start}


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
