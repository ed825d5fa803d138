"""Each model's ``model.options`` and their defaults, torch-free.

The constructors in :mod:`fedsim.models.nets` take their defaults from this table, and scenario
validation reads it, so that checking a scenario does not import torch (about a second).
"""

from __future__ import annotations

from typing import Any

#: ``model.name`` -> option -> default.
OPTIONS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (128,)},
    "cnn": {"channels": (16, 32), "hidden": 64},
    "char_lstm": {"embed": 8, "hidden": 256, "layers": 2},
}
