"""``engine: workers`` (the default) — the server in this process, clients in W gRPC worker processes.

:class:`WorkerGrid` is a Flower Grid that dispatches messages to persistent worker processes.

Virtual client ``c`` is node ``NODE_ID_BASE + c`` and is always served by worker
``c mod W``, so its state stays where it was. Workers run in parallel; each handles its
messages one at a time. A worker that dies turns its pending messages into error replies
(naming the clients and the end of its log), is restarted for the next round, and the
round goes on with the replies it has.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from fedsim.data import Dataset
from fedsim.engine.grid import NODE_ID_BASE, LocalGrid
from fedsim.engine.pool import (GRPC_OPTIONS, SERVICE, TOKEN_ENV, TOKEN_HEADER, WorkerProcess, WorkerStartError,
                                Zygote, stop_workers, wait_ready)
from fedsim.flower.compat import NODE_UNAVAILABLE, Error, Message, message_from_bytes, message_to_bytes
from fedsim.progress import format_duration
from fedsim.scenario import Scenario, ScenarioError

MAX_RESTARTS = 3


class WorkerGrid(LocalGrid):
    """A Grid over W gRPC client workers serving ``num_nodes`` virtual nodes."""

    def __init__(self, devices: list[str], num_nodes: int, run_config: dict, run_dir: Path, env: dict[str, str],
                 start_timeout_s: float = 120.0):
        super().__init__(num_nodes)
        self.devices = devices
        self.run_config, self.run_dir, self.env = run_config, run_dir, env
        self.start_timeout_s = start_timeout_s
        self.token = secrets.token_hex(16)                 # workers serve only the server that started them
        self._auth = ((TOKEN_HEADER, self.token),)
        self._stale: set[int] = set()                      # workers still busy with a timed-out message
        self.workers: list[WorkerProcess] = []
        self.zygote = Zygote(run_dir / "logs", env)
        self._zygote_lock = threading.Lock()                # restarts fork in parallel
        self.channels: list[grpc.Channel | None] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(devices)), thread_name_prefix="fedsim-dispatch")

    # ------------------------------------------------------------- lifecycle
    def start(self) -> "WorkerGrid":
        """:meth:`launch` then :meth:`connect`: every worker started, listening and configured."""
        self.launch()
        return self.connect()

    def launch(self) -> "WorkerGrid":
        """Start the zygote, not waiting for it: the caller may set up meanwhile (the zygote spends
        its first seconds importing torch), then :meth:`connect`."""
        self.zygote.start()
        return self

    def connect(self, dataset: Dataset | None = None) -> "WorkerGrid":
        """Fork the workers, wait until each listens and send it the run config. ``dataset``: the
        run's data set as this process loaded it, handed to the zygote (else it loads it itself).

        On any failure (or Ctrl-C) every worker started so far is stopped before the error propagates.
        """
        try:
            with tempfile.TemporaryDirectory(prefix="fedsim-data-") as tmp:
                dataset_path = self._hand_over_dataset(Path(tmp), dataset)
                self.zygote.warm(self.run_config, dataset_path)   # data and partition: once, for every worker
                for i, dev in enumerate(self.devices):
                    self.workers.append(self._fork(i, dev))
                    self.channels.append(None)
                wait_ready(self.workers, self.start_timeout_s)     # the zygote has read the data set by now
            self._events += [f"the workers' zygote reported: {e} (see {self.zygote.log_path}); the workers "
                             "started, and each loads what it lacks itself" for e in self.zygote.errors]
            list(self._pool.map(self._connect, range(len(self.workers))))   # configured in parallel
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self, i: int) -> None:
        w = self.workers[i]
        channel = grpc.insecure_channel(w.address, options=GRPC_OPTIONS)
        self.channels[i] = channel
        body = json.dumps({"run_config": dict(self.run_config), "state_dir": str(self.run_dir / "client_state")})
        try:
            grpc.channel_ready_future(channel).result(timeout=self.start_timeout_s)
            channel.unary_unary(f"/{SERVICE}/Configure")(body.encode(), timeout=self.start_timeout_s,
                                                         metadata=self._auth)
        except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
            raise WorkerStartError(f"client worker {i} ({w.device}) did not accept the run: {exc}\n"
                                   f"its log ({w.log_path}):\n{w.log_tail()}") from None

    def _restart(self, i: int) -> None:
        old = self.workers[i]
        why = "timed out" if old.alive() else f"had died ({old.how_it_ended})"
        if old.restarts >= MAX_RESTARTS:
            self._events.append(f"worker {i} ({old.device}) {why} and was restarted {MAX_RESTARTS} times already: "
                                f"not restarted, its clients' messages fail (log: {old.log_path})")
            return
        t0 = time.perf_counter()
        if self.channels[i] is not None:
            self.channels[i].close()  # type: ignore[union-attr]
        stop_workers([old])
        new = self._fork(i, old.device)
        new.restarts = old.restarts + 1
        self.workers[i] = new
        wait_ready([new], self.start_timeout_s)
        self._connect(i)
        self._events.append(f"worker {i} ({old.device}) {why}: restarted in {time.perf_counter() - t0:.1f}s "
                            f"(restart {new.restarts} of {MAX_RESTARTS}); its clients are served again")

    def _hand_over_dataset(self, tmp: Path, dataset: Dataset | None) -> Path | None:
        """``dataset`` written for the zygote, which then need not load it itself (for scikit-learn's
        sets that is importing scikit-learn, half a second); None without one."""
        if dataset is None:
            return None
        from fedsim.data import save_dataset

        save_dataset(dataset, tmp / "dataset.npz")
        return tmp / "dataset.npz"

    def _fork(self, i: int, device: str) -> WorkerProcess:
        with self._zygote_lock:
            if self.zygote.gone.is_set():        # it died (e.g. killed for memory): a new one, for restarts
                self._events.append(f"the workers' zygote had exited (log: {self.zygote.log_path}); a new one "
                                    "was started")
                self.zygote.close()
                self.zygote = Zygote(self.run_dir / "logs", self.env).start()
                self.zygote.warm(self.run_config)    # it loads the data itself
            return self.zygote.fork(i, device, {TOKEN_ENV: self.token})

    def close(self) -> None:
        """Stop exactly the workers this grid started and their zygote; close channels."""
        for ch in self.channels:
            if ch is not None:
                ch.close()
        stop_workers(self.workers)
        self.zygote.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "WorkerGrid":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ Grid
    def worker_of(self, node_id: int) -> int:
        """The worker that always serves ``node_id``."""
        return (node_id - NODE_ID_BASE) % len(self.workers)

    def _deliver(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """Dispatch to the workers in parallel (each worker's messages in order); gather the replies."""
        by_worker: dict[int, list[Message]] = {}
        for msg in msgs:
            by_worker.setdefault(self.worker_of(msg.metadata.dst_node_id), []).append(msg)
        deadline = time.monotonic() + (timeout or 3600.0)
        dead = [i for i in by_worker if not self.workers[i].alive() or i in self._stale]
        self._stale.difference_update(dead)
        list(self._pool.map(self._restart, dead))          # in parallel
        jobs = [self._pool.submit(self._serve, i, batch, deadline) for i, batch in by_worker.items()]
        return [reply for job in jobs for reply in job.result()]

    def _serve(self, i: int, msgs: list[Message], deadline: float) -> list[Message]:
        call = self.channels[i].unary_unary(f"/{SERVICE}/Handle")  # type: ignore[union-attr]
        out = []
        for k, msg in enumerate(msgs):
            try:
                raw = call(message_to_bytes(msg), timeout=max(0.001, deadline - time.monotonic()), metadata=self._auth)
            except grpc.RpcError as exc:
                return out + [self._failed(i, m, exc) for m in msgs[k:]]
            out.append(message_from_bytes(raw))
        return out

    def _failed(self, i: int, msg: Message, exc: grpc.RpcError) -> Message:
        w = self.workers[i]
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            w.wait(3.0)               # a dying process may not be reaped yet when its socket closes
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._stale.add(i)        # it may still be training: restart it before it serves again
            what = "timed out"
        elif not w.alive():
            what = f"died ({w.how_it_ended})"
        else:
            what = f"failed ({exc.code().name})"
        event = f"worker {i} ({w.device}) {what} during the round; it is restarted before it serves again"
        if event not in self._events:
            self._events.append(event)
        reason = (f"worker {i} ({w.device}) {what} while serving client {msg.metadata.dst_node_id - NODE_ID_BASE}\n"
                  f"the end of its log ({w.log_path}):\n{w.log_tail(8)}")
        return Message(Error(code=NODE_UNAVAILABLE, reason=reason), reply_to=msg)


def run(scenario: Scenario, out_dir: Path, *, progress: str = "auto", resume: bool = False,
        force: bool = False) -> None:
    """Run ``scenario`` with persistent client workers; every worker is stopped on exit, error or Ctrl-C.

    The zygote is started first, so its imports (torch and the client code, once for all
    workers) overlap this process's own: importing torch and the server, loading the data set
    and partitioning it. The zygote then takes that data set from this process, and forks the
    workers.
    """
    from fedsim.runtime import flower_env, plan_workers

    eng = scenario.engine
    try:
        devices = plan_workers(eng.devices, workers=eng.workers, workers_per_device=eng.workers_per_device)
    except ValueError as exc:
        raise ScenarioError(f"scenario '{scenario.name}'", [f"engine.devices: {exc}"]) from None
    say = _say(progress)
    cores = os.cpu_count() or 1
    on_cpu = sum(d == "cpu" for d in devices)
    if on_cpu > cores:
        say(f"[yellow]engine.workers: {on_cpu} CPU workers on {cores} cores compete for them (each trains with one "
            f"thread): expect no speed-up beyond {cores} workers, and more memory[/yellow]")
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting {len(devices)} client worker(s) on {', '.join(sorted(set(devices)))} ...")
    started = time.perf_counter()
    grid = WorkerGrid(devices, 0, {}, out_dir, flower_env(), eng.start_timeout_s).launch()
    try:
        import torch

        from fedsim.engine.inprocess import run_server_app
        from fedsim.federation import get_federation
        from fedsim.flower.codec import make_run_config
        from fedsim.flower.compat import check_version
        from server.app import app as server_app

        check_version()
        torch.set_num_threads(1)
        grid.run_config = make_run_config(scenario, out_dir, progress, resume, force)
        loading = time.perf_counter()
        fed = get_federation(scenario)
        say(f"loaded {scenario.data.dataset} ({len(fed.dataset.y_train)} train, {len(fed.dataset.y_test)} test "
            f"examples) in {format_duration(time.perf_counter() - loading)}; forking the workers ...")
        grid.num_nodes = fed.num_clients
        grid.connect(fed.dataset)
        say(f"{len(devices)} worker(s) ready in {format_duration(time.perf_counter() - started)}")
        run_server_app(server_app, grid, grid.run_config)
    finally:
        grid.close()


def _say(progress: str):
    """A start-up line on stderr (nothing with ``progress: none``)."""
    if progress == "none":
        return lambda text: None
    from rich.console import Console
    console = Console(stderr=True, soft_wrap=True)
    return lambda text: console.print(text, highlight=False)
