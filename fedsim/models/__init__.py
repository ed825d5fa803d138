"""Model registry: names used in scenarios (``model.name``) mapped to constructors.

:func:`model_names` and :func:`model_options` are torch-free (scenario validation uses them);
the constructors are imported on first use.

Example:
    >>> m = build_model("mlp", input_shape=(4,), num_classes=3, hidden=[8])
    >>> sum(p.numel() for p in m.parameters())
    67
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fedsim.models.options import OPTIONS

if TYPE_CHECKING:
    from torch import nn

_CLASSES = {"mlp": "MLP", "cnn": "CNN", "char_lstm": "CharLSTM"}      # model.name -> class in fedsim.models.nets
assert set(_CLASSES) == set(OPTIONS), "every model needs an entry in OPTIONS and in _CLASSES"


def model_names() -> list[str]:
    """Names accepted by ``model.name``."""
    return sorted(OPTIONS)


def model_options(name: str) -> dict[str, Any]:
    """Extra keyword options of a model (``model.options``) with their defaults."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in OPTIONS[name].items()}


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> "nn.Module":
    """Build a registered model; list options are passed as tuples."""
    if name not in OPTIONS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(model_names())})")
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return _nets()[_CLASSES[name]](tuple(input_shape), int(num_classes), **opts)


def _nets() -> dict[str, Any]:
    """The model classes by class name (importing :mod:`fedsim.models.nets`, and torch)."""
    nets = importlib.import_module("fedsim.models.nets")
    return {cls: getattr(nets, cls) for cls in _CLASSES.values()}


def __getattr__(name: str) -> Any:
    """``MODELS`` (read-only: ``model.name`` -> class) and the model classes, imported (with torch)
    on first use."""
    if name == "MODELS":
        return MappingProxyType({key: _nets()[cls] for key, cls in _CLASSES.items()})
    if name in _CLASSES.values():
        return _nets()[name]
    raise AttributeError(f"module 'fedsim.models' has no attribute {name!r}")


__all__ = ["CNN", "MLP", "CharLSTM", "MODELS", "build_model", "model_names", "model_options"]
