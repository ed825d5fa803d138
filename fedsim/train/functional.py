"""The functional core: per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap(grad)``).

This is fedsim's path for per-sample gradients (DP-SGD, DiceSGD) — the fastest measured on small
CNNs (``../shared/notes/dp-tooling.md``) — and the shape batched multi-client training takes
(``vmap`` over a leading client axis). It works on a model's parameters as a dict, never
mutates the module, and draws no randomness.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    >>> g = per_sample_grads(model, torch.nn.functional.cross_entropy, x, y)
    >>> g["weight"].shape, g["bias"].shape
    (torch.Size([5, 2, 3]), torch.Size([5, 2]))
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of ``loss_fn(model(x_i), y_i)`` for every example ``i``, by trainable parameter.

    Returns:
        ``name -> tensor`` of shape ``(batch, *parameter.shape)``.
    """
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
