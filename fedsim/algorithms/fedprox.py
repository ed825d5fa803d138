"""FedProx's client side: the proximal term ``mu/2 ||w - x_t||^2`` added to every batch loss.

On the server FedProx is FedAvg (:func:`fedsim.algorithms.optimizers.fedavg`).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> anchor = [p.detach().clone() for p in model.parameters()]
    >>> with torch.no_grad():
    ...     model.bias += 2.0
    >>> float(proximal_term(model, anchor, mu=0.5).detach())     # 0.5 / 2 * 2^2
    1.0

References:
    T. Li et al., Federated Optimization in Heterogeneous Networks, arXiv:1812.06127.
"""

from __future__ import annotations

from typing import Any, Sequence, cast

import torch
from torch import nn

from fedsim.core.client import ClientPlugin, ClientRound, LocalRun
from fedsim.core.server import Payload


def proximal_term(model: nn.Module, anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """``mu / 2 * sum_p ||p - anchor_p||^2`` over all of ``model``'s parameters."""
    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    return cast(torch.Tensor, 0.5 * mu * prox)


class _ProxRound(ClientRound):
    def __init__(self, mu: float, anchor: list[torch.Tensor]):
        self.mu, self.anchor = mu, anchor

    def loss_term(self, run: LocalRun) -> torch.Tensor:
        return proximal_term(run.model, self.anchor, self.mu)


class FedProx(ClientPlugin):
    """Adds the proximal term around the round's global model (snapshotted when the round begins)."""

    def __init__(self, name: str, mu: float):
        self.name, self.mu = name, float(mu)

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        return _ProxRound(self.mu, [p.detach().clone() for p in run.model.parameters()])
