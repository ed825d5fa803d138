"""Atomic file writes: every result file, checkpoint and client-state file fedsim writes goes through here.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write_text(p, "hi"); p.read_text(), oct(p.stat().st_mode & 0o777)
    ('hi', '0o644')
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644, *, durable: bool = False) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    A reader sees either the old file or the complete new one; a crash leaves no
    partial file (the temporary file is removed on error). The file gets ``mode``; the
    temporary file is private (0600) until then, so ``mode=0o600`` never exposes the data.
    ``durable``: also flush the file and its folder to disk (checkpoints survive a power loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (new and renamed files) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: str | Path) -> None:
    """Flush every file in ``folder`` and the folder itself to disk."""
    for f in Path(folder).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Writes UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)
