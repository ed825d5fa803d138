"""Per-node client state (``context.state``) on disk, so it outlives processes and resumes.

One file per node, ``node-<id>.pb``: Flower's own RecordDict protobuf (never pickle),
written atomically with mode 0600 (it may hold private data, e.g. DiceSGD's error buffer).
:func:`restore_snapshot` puts a checkpoint's snapshot back, keeping the current values of the
state keys that must never roll back (privacy ledgers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping

from flwr.app import RecordDict

from fedsim.flower.codec import load_client_state, save_client_state, state_owner
from fedsim.flower.compat import recorddict_from_bytes, recorddict_to_bytes
from fedsim.results.checkpoint import restore_client_state
from fedsim.runtime.files import atomic_write_bytes


def state_path(state_dir: Path, node_id: int) -> Path:
    """Where node ``node_id``'s state lives."""
    return Path(state_dir) / f"node-{node_id}.pb"


def load_state(state_dir: Path | None, node_id: int) -> RecordDict:
    """The saved state of a node (empty when there is none)."""
    path = state_path(state_dir, node_id) if state_dir else None
    if path is None or not path.exists():
        return RecordDict()
    return recorddict_from_bytes(path.read_bytes())


def save_state(state_dir: Path | None, node_id: int, state: RecordDict) -> None:
    """Write a node's state (nothing when it is empty), atomically, readable by the owner only."""
    if state_dir is None or not len(state):
        return
    atomic_write_bytes(state_path(state_dir, node_id), recorddict_to_bytes(state), mode=0o600)


def restore_snapshot(snapshot: Path, state_dir: Path, keep: Mapping[str, Collection[str]] | None = None) -> None:
    """Make ``state_dir`` the snapshot's client state, except, per plugin in ``keep``, the listed
    keys of each client's (dict) state, which keep their current (newer) values."""
    keep = {k: v for k, v in (keep or {}).items() if v}
    current = {p.name: load_state(state_dir, int(p.stem.removeprefix("node-")))
               for p in sorted(Path(state_dir).glob("node-*.pb"))} if keep and Path(state_dir).is_dir() else {}
    restore_client_state(snapshot, state_dir)
    for name, now in current.items():
        node = int(name.removeprefix("node-").removesuffix(".pb"))
        merged = load_state(state_dir, node)
        owners = {owner for k in now.keys() if (owner := state_owner(k)) and owner[1] in keep}
        for cid, plugin in sorted(owners):
            newer = load_client_state(now, cid, plugin) or {}
            value = dict(load_client_state(merged, cid, plugin) or {})
            value.update({k: newer[k] for k in keep[plugin] if k in newer})
            save_client_state(merged, cid, plugin, value)
        save_state(state_dir, node, merged)
