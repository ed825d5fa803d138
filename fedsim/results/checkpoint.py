"""Checkpoints as safetensors files (never pickle), and the client-state snapshots beside them.

A checkpoint is a flat ``name -> tensor`` mapping plus string metadata (round, config,
fedsim version, the JSON skeleton of the server state ...). It is written atomically (mode
0644, like every result file), so a crash while saving leaves the previous checkpoint intact.
A run's round checkpoints live in ``RUN_DIR/checkpoints/round-NNNNN.safetensors``; the client
state of that moment (``RUN_DIR/client_state``, which may hold private client data) is copied
to ``round-NNNNN.client_state/`` (0700) first, so a checkpoint file exists only once its
snapshot is complete.

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
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.runtime.files import atomic_write_bytes, fsync_dir, fsync_files

if TYPE_CHECKING:  # torch and safetensors are imported lazily: reports need neither.
    import torch

__all__ = ["checkpoint_path", "iter_intact", "load_checkpoint", "prune_checkpoints", "restore_client_state", "round_checkpoints", "save_checkpoint",
           "snapshot_client_state", "snapshot_path"]


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
    *,
    durable: bool = False,
) -> None:
    """Saves tensors and string metadata to a safetensors file, atomically.

    Args:
        path: Destination file; its folder is created if missing.
        tensors: Name -> tensor. Tensors are detached, moved to CPU and made
            contiguous; tensors sharing storage (tied weights) are copied.
        metadata: Optional str -> str header entries.
        durable: Flush the file to disk before returning (round checkpoints).

    Raises:
        TypeError: If a value is not a dense tensor or metadata is not str -> str.
    """
    from safetensors.torch import save

    atomic_write_bytes(path, save(_prepare_tensors(tensors), metadata=_check_metadata(metadata)), durable=durable)


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


def checkpoint_path(run_dir: str | Path, server_round: int) -> Path:
    """Where round ``server_round``'s checkpoint of a run lives."""
    return Path(run_dir) / "checkpoints" / f"round-{server_round:05d}.safetensors"


def snapshot_path(checkpoint: str | Path) -> Path:
    """The client-state snapshot that belongs to a round checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".client_state")


def round_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's round checkpoints, newest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("round-*.safetensors"), reverse=True)


def snapshot_client_state(state_dir: str | Path, dest: str | Path) -> None:
    """Copy a client-state directory to ``dest`` (replacing it) as one step: a half-written
    snapshot never has ``dest``'s name. The copy is private (0700 directory, files keep 0600)."""
    state_dir, dest = Path(state_dir), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        if state_dir.is_dir():
            for f in sorted(state_dir.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
        fsync_files(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_client_state(snapshot: str | Path, state_dir: str | Path) -> None:
    """Make ``state_dir`` hold exactly the snapshot's files (what the clients had at that round)."""
    snapshot, state_dir = Path(snapshot), Path(state_dir)
    if not snapshot.is_dir():
        raise FileNotFoundError(f"no client-state snapshot at {snapshot}")
    if state_dir.exists():
        shutil.rmtree(state_dir)
    shutil.copytree(snapshot, state_dir)
    os.chmod(state_dir, 0o700)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest round checkpoints (and their snapshots); 0 keeps all."""
    removed = []
    for old in round_checkpoints(run_dir)[keep:] if keep > 0 else []:
        old.unlink(missing_ok=True)
        shutil.rmtree(snapshot_path(old), ignore_errors=True)
        removed.append(old)
    return removed


def iter_intact(run_dir: str | Path) -> Iterator[tuple[Path, dict, dict[str, str]] | tuple[Path, Exception]]:
    """Each round checkpoint, newest first: ``(path, tensors, metadata)`` when it and its client-state
    snapshot are readable, else ``(path, error)``."""
    for path in round_checkpoints(run_dir):
        try:
            if not snapshot_path(path).is_dir():
                raise FileNotFoundError(f"its client-state snapshot {snapshot_path(path).name} is missing")
            tensors, meta = load_checkpoint(path)
            yield path, tensors, meta
        except Exception as exc:  # a truncated or corrupt file: report it, try the previous one
            yield path, exc
