"""Shared fixtures: Flower's environment switches and small scenario texts."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
torch.set_num_threads(1)

TINY = """\
name: tiny
seed: 3
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 6, alpha: 0.5, min_size: 5}
model: {name: mlp, options: {hidden: [16]}}
federation:
  rounds: 3
  clients_per_round: 3
  local: {steps: 3, batch_size: 16, lr: 0.1}
"""


@pytest.fixture
def tiny_yaml() -> str:
    """A scenario that trains in well under a second per round."""
    return TINY
