"""Model checkpoints as safetensors files (never pickle).

A checkpoint is a flat ``name -> tensor`` mapping plus string metadata (round,
config hash, fedsim version ...). It is written atomically, so a crash while
saving leaves the previous checkpoint intact.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/model.safetensors"
    >>> save_checkpoint(path, {"w": torch.ones(2, 3)}, {"round": "3"})
    >>> tensors, meta = load_checkpoint(path)
    >>> tensors["w"].shape, meta["round"]
    (torch.Size([2, 3]), '3')
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and safetensors are imported lazily: reports need neither.
    import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Returns metadata as a plain dict after checking every key and value is a string."""
    if metadata is None:
        return {}
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"checkpoint metadata must map str to str; bad entries: {bad}")
    return dict(metadata)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checks types and returns detached, dense, contiguous CPU tensors with unshared storage."""
    import torch

    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint tensor names must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise TypeError(f"checkpoint entry {key!r} is not dense ({value.layout})")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_checkpoint(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Saves tensors and string metadata to a safetensors file, atomically.

    Args:
        path: Destination file; its folder is created if missing.
        tensors: Name -> tensor. Tensors are detached, moved to CPU and made
            contiguous; tensors sharing storage (tied weights) are copied.
        metadata: Optional str -> str header entries.

    Raises:
        TypeError: If a value is not a dense tensor or metadata is not str -> str.
    """
    from safetensors.torch import save_file

    prepared = _prepare_tensors(tensors)
    meta = _check_metadata(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(prepared, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads a safetensors checkpoint onto the CPU.

    Args:
        path: A file written by :func:`save_checkpoint` (or any safetensors file).

    Returns:
        ``(tensors, metadata)``; metadata is empty when the file has none.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = dict(f.metadata() or {})
    return tensors, metadata
