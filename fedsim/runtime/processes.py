"""Processes fedsim starts: start them in their own session, stop exactly those (by PID or by their
own process group), and free ports.

Every process fedsim starts runs in its own session (:func:`start_process`), so a Ctrl-C in the
terminal reaches only fedsim, and signalling a process group reaches that process's children
(a SuperNode's app processes) and nobody else.

Example:
    >>> import subprocess, sys
    >>> p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    >>> stop_processes([p], grace_s=5.0); p.returncode is not None
    True
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(argv: Sequence[str], *, env: dict[str, str], log_path: str | Path,
                  pipes: bool = False) -> subprocess.Popen:
    """Start ``argv`` in its own session, stderr appended to ``log_path``; stdin closed and stdout to
    the log too, or (``pipes``) both binary pipes the caller writes and reads."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(argv), stdout=subprocess.PIPE if pipes else log, stderr=log,
                                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL, env=env,
                                start_new_session=True)


def _send(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)    # its own session: the group holds only it and its children
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float = 5.0, *, group: bool = False) -> None:
    """SIGTERM every process, wait up to ``grace_s`` in total, SIGKILL what is left, and reap all.

    Args:
        procs: processes this program started (nothing else is ever signalled).
        grace_s: how long they may take to exit after SIGTERM, all together.
        group: signal each process's group (it was started in its own session) rather than the
            process alone, and SIGKILL the group at the end so no child outlives it.
    """
    for p in procs:
        if p.poll() is None:
            _send(p, signal.SIGTERM, group)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _send(p, signal.SIGKILL, group)
            p.wait(timeout=5)
        if group:
            _send(p, signal.SIGKILL, True)      # children left in the group (app processes)
