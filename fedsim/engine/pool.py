"""Client worker processes: start, wait for, watch and stop them (exactly the ones started).

A worker is ``python -m fedsim.engine.worker``: a gRPC server on 127.0.0.1 that prints its
port on its first stdout line. Workers run in their own session (a Ctrl-C in the
terminal reaches only the server, which then stops them), and exit by themselves if the
server process disappears. This module knows processes, not Flower.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import RunError
from fedsim.runtime import start_process, stop_processes, worker_env

PORT_PREFIX = "FEDSIM_WORKER_PORT "
#: The per-run secret a worker requires in the metadata of every call (given through its environment).
TOKEN_ENV = "FEDSIM_WORKER_TOKEN"
#: gRPC metadata key carrying the per-run worker token.
TOKEN_HEADER = "x-fedsim-token"
#: The worker's gRPC service (raw bytes RPCs, see ``fedsim.engine.worker``).
SERVICE = "fedsim.Worker"
#: gRPC's default 4 MiB message cap is far too small for model weights.
GRPC_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


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
    log_path = log_dir / f"worker-{index}.log"
    full_env = {**env, **worker_env(device), "FEDSIM_WORKER_INDEX": str(index), TOKEN_ENV: token}
    proc = start_process([sys.executable, "-m", "fedsim.engine.worker", "--parent-pid", str(os.getpid())],
                         env=full_env, log_path=log_path, pipe_stdout=True)
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
    stop_processes([w.proc for w in workers], grace_s)
    for w in workers:
        if w.proc.stdout:
            w.proc.stdout.close()
