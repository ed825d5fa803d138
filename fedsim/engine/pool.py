"""Client worker processes: start, wait for, watch and stop them (exactly the ones started).

A worker is ``python -m fedsim.flower.worker``: a gRPC server on 127.0.0.1 that prints its
port on its first stdout line. Workers run in their own session (a Ctrl-C in the
terminal reaches only the server, which then stops them), and exit by themselves if the
server process disappears. This module knows processes, not Flower.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedsim.engine.devices import worker_env
from fedsim.errors import RunError

PORT_PREFIX = "FEDSIM_WORKER_PORT "
#: The per-run secret a worker requires in the metadata of every call (given through its environment).
TOKEN_ENV = "FEDSIM_WORKER_TOKEN"


class WorkerStartError(RunError):
    """A worker did not come up in time, or exited while starting."""


@dataclass
class WorkerProcess:
    """One started worker: its process, device, port and log file."""

    index: int
    device: str
    proc: subprocess.Popen
    log_path: Path
    port: int = 0
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The end of the worker's stderr log (for error reports)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_worker(index: int, device: str, log_dir: Path, env: dict[str, str], token: str) -> WorkerProcess:
    """Start one worker process (not waiting for it); it serves only callers that present ``token``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{index}.log"
    full_env = {**env, **worker_env(device), "FEDSIM_WORKER_INDEX": str(index), TOKEN_ENV: token}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedsim.flower.worker", "--parent-pid", str(os.getpid())],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=full_env,
                                start_new_session=True, text=True)
    return WorkerProcess(index, device, proc, log_path)


def wait_ready(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Read each worker's port line; raise WorkerStartError (with the log tail) on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    for w in workers:
        if w.port:
            continue
        line = _read_line(w, max(0.0, deadline - time.monotonic()))
        if line is None or not line.startswith(PORT_PREFIX):
            state = "exited" if not w.alive() else f"did not start within {timeout_s:.0f} s"
            raise WorkerStartError(f"client worker {w.index} ({w.device}) {state}; its log ({w.log_path}):\n"
                                   f"{w.log_tail()}")
        w.port = int(line[len(PORT_PREFIX):])


def _read_line(w: WorkerProcess, timeout_s: float) -> str | None:
    """One stdout line, bounded in time (a thread does the blocking read)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(w.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    return box[0].strip() if box and box[0] else None


def stop_workers(workers: list[WorkerProcess], grace_s: float = 5.0) -> None:
    """SIGTERM every worker we started, then SIGKILL what is left after ``grace_s``; reap all."""
    for w in workers:
        if w.alive():
            _signal(w, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(w, signal.SIGKILL)
            w.proc.wait(timeout=5)
        if w.proc.stdout:
            w.proc.stdout.close()


def _signal(w: WorkerProcess, sig: int) -> None:
    try:
        os.kill(w.proc.pid, sig)
    except ProcessLookupError:
        pass
