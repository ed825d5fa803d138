"""Model registry: names used in scenarios (``model.name``) mapped to constructors.

Example:
    >>> m = build_model("mlp", input_shape=(4,), num_classes=3, hidden=[8])
    >>> sum(p.numel() for p in m.parameters())
    67
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from fedsim.models.nets import CNN, MLP, CharLSTM

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "char_lstm": CharLSTM}


def model_names() -> list[str]:
    """Names accepted by ``model.name``."""
    return sorted(MODELS)


def model_options(name: str) -> dict[str, Any]:
    """Extra keyword options of a model (``model.options``) with their defaults."""
    params = inspect.signature(MODELS[name]).parameters
    return {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
            for k, p in params.items() if k not in ("input_shape", "num_classes")}


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model; list options are passed as tuples."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(model_names())})")
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return MODELS[name](tuple(input_shape), int(num_classes), **opts)


__all__ = ["CNN", "MLP", "CharLSTM", "MODELS", "build_model", "model_names", "model_options"]
