"""The zygote: one template process per run that forks the client workers.

It is a fresh interpreter (``python -m fedsim.engine.zygote``, started by
:class:`fedsim.engine.pool.Zygote`) that imports torch, torch's optimizer machinery, the
ClientApp and the data loaders once, loads the run's data set and partition once, and then forks
a worker per request. A worker thus starts in milliseconds with its data in memory, instead of a
new interpreter spending two to three seconds of CPU on imports and loading, and the workers
share the zygote's pages (copy-on-write) instead of each holding its own torch and data set.

Why not ``multiprocessing``'s ``forkserver``: its children re-import the caller's ``__main__``
module, so a user's script that calls ``run_scenario`` without an ``if __name__ == "__main__":``
guard would run itself again in every worker.

The zygote never touches CUDA, so a GPU worker creates its own CUDA context after the fork (it
is given its ``CUDA_VISIBLE_DEVICES`` before torch initialises CUDA; the zygote's environment
has ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so even a ``torch.cuda.is_available()`` on the way
would not initialise CUDA). It runs no Python thread, and its environment keeps OpenBLAS, OpenMP
and MKL to one thread each (each worker trains with one thread anyway), so the fork copies no
lock another thread holds.

Protocol: JSON lines, never pickle. On stdin, from the server:

- ``{"op": "warm", "run_config": {...}, "dataset": path}``: take the data set the server wrote
  to ``path`` (:func:`fedsim.data.save_dataset`; without it, load it), partition it and pay
  torch's one-off optimizer import, before forking, so the workers inherit all of it;
- ``{"op": "fork", "index": i, "env": {...}, "log": path}``: fork worker ``i`` with these
  environment variables added, its output appended to ``log``;
- ``{"op": "signal", "pid": p, "signal": s}``: signal a worker it forked and has not yet reaped
  (so a pid is never signalled after it may have been reused).

On stdout, to the server: ``{"event": "forked", "index", "pid"}``, ``{"event": "port", "index",
"pid", "port"}`` (written by the worker itself once it listens), ``{"event": "exit", "index",
"pid", "code"}`` (the exit code, negative for a signal, as :mod:`subprocess` reports it),
``{"event": "fork_failed", "index", "message"}`` and ``{"event": "error", "message"}`` (a
command that failed; the zygote goes on).

When stdin closes (the server stopped it or died), the zygote stops every worker still running
(SIGTERM, SIGKILL after :data:`GRACE_S`) and exits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback

#: How long workers get to exit after SIGTERM when the zygote shuts down.
GRACE_S = 2.0


class Zygote:
    """The zygote's state: the workers it forked and has not reaped yet."""

    def __init__(self, report_fd: int):
        self.report_fd = report_fd
        self.children: dict[int, int] = {}          # pid -> worker index

    def report(self, **event: object) -> None:
        report_line(self.report_fd, event)

    def handle(self, cmd: dict) -> None:
        op = cmd.get("op")
        if op == "warm":
            from fedsim.engine.worker import warm_up
            started = time.perf_counter()
            warm_up(cmd["run_config"], cmd.get("dataset"))
            how = "taken from the server's file" if cmd.get("dataset") else "loaded"
            print(f"zygote (pid {os.getpid()}): data set {how}, partitioned, warm in "
                  f"{time.perf_counter() - started:.2f}s", file=sys.stderr, flush=True)
        elif op == "fork":
            index = int(cmd["index"])
            try:
                self.fork(index, dict(cmd["env"]), str(cmd["log"]))
            except OSError as exc:                    # EAGAIN, ENOMEM: that worker does not start
                self.report(event="fork_failed", index=index, message=f"{type(exc).__name__}: {exc}")
        elif op == "signal":
            pid = int(cmd["pid"])
            if pid in self.children:
                os.kill(pid, int(cmd["signal"]))
        else:
            raise ValueError(f"unknown zygote command {op!r}")

    def fork(self, index: int, env: dict[str, str], log: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:                                  # the worker: never returns into the zygote's loop
            code = 1
            try:
                from fedsim.engine.worker import serve
                serve(index, env, log, self.report_fd, zygote_pid)
                code = 0
            except BaseException:                     # noqa: BLE001 - reported in the worker's log
                traceback.print_exc()
            finally:
                os._exit(code)
        self.children[pid] = index
        self.report(event="forked", index=index, pid=pid)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is not None:
                self.report(event="exit", index=index, pid=pid, code=_exit_code(status))

    def shutdown(self) -> None:
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL)
        while self.children:
            self.reap()
            time.sleep(0.01)


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def report_line(fd: int, obj: dict) -> None:
    """One JSON line in one write (under PIPE_BUF, so lines from several processes never mix)."""
    os.write(fd, (json.dumps(obj) + "\n").encode())


def _preload() -> None:
    """Everything every worker imports, once."""
    import torch
    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401 - what torch's optimizers import on first use (about 1 s of CPU)

    import clients.app  # noqa: F401
    import fedsim.engine.worker  # noqa: F401
    import fedsim.federation  # noqa: F401
    import fedsim.flower.codec  # noqa: F401


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the server decides when its workers stop
    report_fd = os.dup(1)                            # stdout is the report pipe; prints go to the log
    os.dup2(2, 1)
    zygote = Zygote(report_fd)
    _preload()
    buffer = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        zygote.reap()
        if not ready:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:                                # the server closed our stdin, or died
            zygote.shutdown()
            return 0
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    zygote.handle(json.loads(line))
                except Exception as exc:  # noqa: BLE001 - said to the server, which decides; the zygote goes on
                    traceback.print_exc()
                    zygote.report(event="error", message=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)       # no teardown of torch's modules: nothing is left to flush
