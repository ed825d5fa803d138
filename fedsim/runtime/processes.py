"""Processes fedsim starts: stop exactly those (by PID or by their own process group), and free ports.

Every process fedsim starts runs in its own session (``start_new_session=True``), so its
process group is its own and signalling the group reaches its children (a SuperNode's app
processes) and nobody else.

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
from typing import Sequence


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
