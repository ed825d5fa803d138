"""Shared fixtures: small scenario texts (the session's environment is set in ../conftest.py)."""

from __future__ import annotations

import pytest

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
