"""Client worker processes: start, wait for, watch and stop them (exactly the ones started).

Workers are forked by the run's zygote (:mod:`fedsim.engine.zygote`), a template process that
has already imported torch and the client code and loaded the data: starting a worker takes
milliseconds, and the workers share the zygote's memory. :meth:`Zygote.start` returns at once,
so the zygote's imports overlap the server's own set-up.

A worker (:func:`fedsim.engine.worker.serve`) is a gRPC server on 127.0.0.1; the zygote reports
its pid, its port and, when it has reaped it, its exit code. Workers run in their own session (a
Ctrl-C in the terminal reaches only the server, which then stops them) and exit by themselves if
the zygote disappears, which exits when the server closes its stdin or dies. This module knows
processes, not Flower.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedsim.errors import RunError
from fedsim.engine.zygote import GRACE_S as ZYGOTE_GRACE_S
from fedsim.runtime import start_process, stop_processes, worker_env

#: The per-run secret a worker requires in the metadata of every call (given through its environment).
TOKEN_ENV = "FEDSIM_WORKER_TOKEN"
#: gRPC metadata key carrying the per-run worker token.
TOKEN_HEADER = "x-fedsim-token"
#: The worker's gRPC service (raw bytes RPCs, see ``fedsim.engine.worker``).
SERVICE = "fedsim.Worker"
#: gRPC's default 4 MiB message cap is far too small for model weights.
GRPC_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


#: The zygote's environment: numeric libraries with one thread (nothing but its main thread is
#: alive when it forks), and a CUDA check that cannot initialise CUDA in it.
ZYGOTE_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


class WorkerStartError(RunError):
    """A worker did not come up in time, or exited while starting."""


class WorkerProcess:
    """One worker the zygote forked: its index, device, pid, port, log and (once reaped) exit code."""

    def __init__(self, zygote: "Zygote", index: int, device: str, log_path: Path):
        self.zygote, self.index, self.device, self.log_path = zygote, index, device, log_path
        self.pid = 0
        self.port = 0
        self.restarts = 0
        self.returncode: int | None = None          # negative: killed by that signal
        self.failure = ""                            # why the zygote could not fork it
        self.listening = threading.Event()
        self.exited = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return not self.exited.is_set()

    @property
    def how_it_ended(self) -> str:
        """``exit code N`` (negative: killed by that signal), or why the code is unknown."""
        if self.returncode is not None:
            return f"exit code {self.returncode}"
        if self.failure:
            return f"it could not be forked: {self.failure}"
        return "its zygote died, and with it its exit code"

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the worker to end; whether it has."""
        return self.exited.wait(timeout_s)

    def signal(self, sig: int) -> None:
        """Have the zygote send ``sig`` (it signals only a worker it has not reaped)."""
        if self.pid and self.alive():
            self.zygote.send({"op": "signal", "pid": self.pid, "signal": int(sig)})

    def log_tail(self, lines: int = 15) -> str:
        """The end of the worker's log (for error reports)."""
        return _tail(self.log_path, lines)


class Zygote:
    """The run's zygote process and the workers it forked (see :mod:`fedsim.engine.zygote`)."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_path = log_dir / "zygote.log"
        self.env = {**env, **ZYGOTE_ENV}
        self.proc: subprocess.Popen | None = None
        self.gone = threading.Event()                # its stdout closed: it exited
        self.errors: list[str] = []
        self._by_pid: dict[int, WorkerProcess] = {}
        self._forking: dict[int, WorkerProcess] = {}  # worker index -> its fork request, not yet answered
        self._early: dict[int, list[dict]] = {}      # events of a pid whose "forked" has not come yet
        self._lock = threading.Lock()

    def start(self) -> "Zygote":
        """Start the zygote, not waiting for its imports."""
        self.proc = start_process([sys.executable, "-m", "fedsim.engine.zygote"], env=self.env,
                                  log_path=self.log_path, pipes=True)
        threading.Thread(target=self._read, name="fedsim-zygote-reader", daemon=True).start()
        return self

    def send(self, cmd: dict) -> None:
        """One command line on the zygote's stdin (it answers in order, once its imports are done)."""
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()                                   # type: ignore[union-attr]
        except (BrokenPipeError, ValueError):        # it is gone: its workers are reported exited
            pass

    def warm(self, run_config: dict, dataset_path: Path | None = None) -> None:
        """Have the zygote take the run's data set (from ``dataset_path``, which the caller may delete
        once a worker forked after this listens; else it loads it) and partition it, before it forks."""
        self.send({"op": "warm", "run_config": dict(run_config), **({"dataset": str(dataset_path)}
                                                                    if dataset_path else {})})

    def fork(self, index: int, device: str, env: dict[str, str]) -> WorkerProcess:
        """Request worker ``index`` on ``device`` with ``env`` added to the zygote's environment."""
        w = WorkerProcess(self, index, device, self.log_path.parent / f"worker-{index}.log")
        with self._lock:
            if self.gone.is_set():
                w.exited.set()
                return w
            self._forking[index] = w
        self.send({"op": "fork", "index": index, "log": str(w.log_path),
                   "env": {**worker_env(device), **env, "FEDSIM_WORKER_INDEX": str(index)}})
        return w

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:            # type: ignore[union-attr]
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    self._on(event)
        finally:                                     # EOF: the zygote and every worker it forked are gone
            self.proc.stdout.close()                 # type: ignore[union-attr]
            with self._lock:
                self.gone.set()
                for w in [*self._by_pid.values(), *self._forking.values()]:
                    w.exited.set()                   # workers exit by themselves once the zygote is gone

    def _on(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "fork_failed" and event.get("index") in self._forking:
            w = self._forking.pop(event["index"])
            w.failure = str(event.get("message"))
            w.exited.set()
        elif kind == "forked" and event.get("index") in self._forking:
            w = self._forking.pop(event["index"])
            w.pid = int(event["pid"])
            self._by_pid[w.pid] = w
            for early in self._early.pop(w.pid, []):  # a worker can write its port before the zygote says it forked
                self._on(early)
        elif kind in ("port", "exit") and event.get("pid") not in self._by_pid:
            self._early.setdefault(int(event["pid"]), []).append(event)
        elif kind == "port":
            w = self._by_pid[event["pid"]]
            w.port = int(event["port"])
            w.listening.set()
        elif kind == "exit":
            w = self._by_pid.pop(event["pid"])
            w.returncode = int(event["code"])
            w.exited.set()
        elif kind == "error":
            self.errors.append(str(event.get("message")))

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log_path, lines)

    def close(self) -> None:
        """Close its stdin (it stops any worker left, then exits) and reap it; SIGTERM, then
        SIGKILL, only if it has not exited a second after its own grace period."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()                  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=ZYGOTE_GRACE_S + 1.0)
        except subprocess.TimeoutExpired:
            stop_processes([self.proc], grace_s=2.0)


def wait_ready(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Wait until each worker listens; raise WorkerStartError (with the log tail) on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    for w in workers:
        while not w.listening.is_set() and w.alive() and time.monotonic() < deadline:
            w.listening.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        if w.listening.is_set() and w.alive():
            continue
        if w.zygote.gone.is_set() and not w.pid:
            raise WorkerStartError(f"the zygote that forks the client workers exited; its log ({w.zygote.log_path})"
                                   f":\n{w.zygote.log_tail()}")
        state = f"ended ({w.how_it_ended})" if not w.alive() else f"did not start within {timeout_s:.0f} s"
        raise WorkerStartError(f"client worker {w.index} ({w.device}) {state}; its log ({w.log_path}):\n"
                               f"{w.log_tail()}")


def stop_workers(workers: list[WorkerProcess], grace_s: float = 5.0) -> None:
    """SIGTERM every worker we started, then SIGKILL what is left after ``grace_s``; wait for all.

    A worker whose fork the zygote has not reported yet is left to :meth:`Zygote.close`."""
    forked = [w for w in workers if w.pid]
    for w in forked:
        w.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in forked:
        if not w.wait(max(0.05, deadline - time.monotonic())):
            w.signal(signal.SIGKILL)
            w.wait(5.0)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
