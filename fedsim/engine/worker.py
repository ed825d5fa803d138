"""A persistent client worker: a gRPC server on 127.0.0.1 that runs the ClientApp for its nodes.

Forked by the run's zygote (:mod:`fedsim.engine.zygote`) and run by :func:`serve`. It serves fedsim's
ClientApp (``clients.app:app``) and nothing else. It keeps the
model code, data and (on a GPU) the CUDA context warm across rounds, serves many
virtual clients one message at a time, and keeps each node's ``context.state`` in a
file under the run directory (mode 0600, ``fedsim.flower.state_store``), so client state
survives worker restarts. It serves only the server that started it (a per-run token).

RPCs (raw bytes, no code generation, never pickle):
- ``/fedsim.Worker/Configure``: JSON ``{"run_config": {...}, "state_dir": str, "run_id": int}``.
- ``/fedsim.Worker/Handle``: a Flower ``Message`` protobuf in, the reply ``Message`` protobuf out.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from types import MappingProxyType

import grpc

from fedsim.engine.pool import GRPC_OPTIONS, SERVICE, TOKEN_ENV, TOKEN_HEADER
from fedsim.flower.state_store import load_state, save_state


class WorkerService:
    """Holds the run config, the ClientApp and one Context per node."""

    def __init__(self) -> None:
        self.run_config: dict = {}
        self.state_dir: Path | None = None
        self.run_id = 1
        self.contexts: dict[int, object] = {}
        self.client_app = None

    def configure(self, request: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._authorize(ctx)
        if self.client_app is not None:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker is already configured for a run")
        cfg = json.loads(request)
        self.run_config, self.run_id = cfg["run_config"], int(cfg.get("run_id", 1))
        self.state_dir = Path(cfg["state_dir"]) if cfg.get("state_dir") else None
        from clients.app import app
        self.client_app = app
        warm_up(self.run_config)
        device = os.environ.get("FEDSIM_DEVICE", "cpu")
        if device.startswith("cuda"):
            import torch
            torch.zeros(1, device=device)   # create the CUDA context now, not in round 1
        return b"ok"

    def _authorize(self, ctx: grpc.ServicerContext) -> None:
        """Serve only the server that started us: it passed a per-run token in our environment."""
        given = dict(ctx.invocation_metadata()).get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given, os.environ.get(TOKEN_ENV, "")) or not given:
            ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "missing or wrong worker token")

    def handle(self, request: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._authorize(ctx)
        if self.client_app is None:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "worker not configured")
        from fedsim.flower.compat import Error, Message

        from fedsim.flower.compat import CLIENT_EXCEPTION, message_from_bytes, message_to_bytes

        msg = message_from_bytes(request)
        _log_message(msg)
        context = self._context(msg.metadata.dst_node_id)
        try:
            reply = self.client_app(msg, context)  # type: ignore[misc]
        except Exception as exc:  # becomes an error reply, like a crashing ClientApp in Flower's runtimes
            reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        save_state(self.state_dir, msg.metadata.dst_node_id, context.state)
        return message_to_bytes(reply)

    def _context(self, node_id: int):
        from fedsim.flower.compat import Context

        if node_id not in self.contexts:
            self.contexts[node_id] = Context(run_id=self.run_id, node_id=node_id, node_config={},
                                             state=load_state(self.state_dir, node_id),
                                             run_config=MappingProxyType(self.run_config))  # type: ignore[arg-type]
        return self.contexts[node_id]


def _log_message(msg) -> None:
    """One line in the worker's log per message it starts on, so the log says what a worker that
    died was doing (the server quotes the end of the log in the clients' error replies)."""
    try:
        cfg = msg.content["config"]
    except KeyError:            # a message without fedsim's config record: the client rejects it
        cfg = {}
    print(f"{time.strftime('%H:%M:%S')} worker {os.environ.get('FEDSIM_WORKER_INDEX', '?')} (pid {os.getpid()}): "
          f"round {cfg.get('server-round', '?')}, client {cfg.get('client-id', '?')}, {msg.metadata.message_type}",
          file=sys.stderr, flush=True)


def warm_up(run_config: dict, dataset_path: str | None = None) -> None:
    """Load data and partition and pay torch's one-off optimizer import, before round 1. The zygote
    does it before forking (every worker inherits it), taking the data set the server wrote to
    ``dataset_path``; a worker's own call then finds it done."""
    import torch

    from fedsim.data import read_dataset
    from fedsim.federation import get_federation
    from fedsim.flower.codec import scenario_from_config

    get_federation(scenario_from_config(run_config), read_dataset(dataset_path) if dataset_path else None)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0).zero_grad()


def _watch_parent(parent_pid: int, server: grpc.Server) -> None:
    """Exit when the zygote that forked us is gone (it exits with the run's server process)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            server.stop(grace=0)
            return


def serve(index: int, env: dict[str, str], log_path: str, report_fd: int, zygote_pid: int) -> None:
    """A forked worker's life: serve until SIGTERM or until the zygote that forked it disappears.

    Runs in the child of :meth:`fedsim.engine.zygote.Zygote.fork`; its port goes to the server as
    a line on ``report_fd``.
    """
    from fedsim.engine.zygote import report_line

    os.setsid()     # leave the zygote's session: signals meant for it or the server do not reach us
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(null)
    os.close(log)
    os.environ.update(env)          # CUDA_VISIBLE_DEVICES among them, before torch initialises CUDA
    service = WorkerService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=GRPC_OPTIONS)
    handlers = {"Configure": grpc.unary_unary_rpc_method_handler(service.configure),
                "Handle": grpc.unary_unary_rpc_method_handler(service.handle)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # Stop at once: client state is written (atomically) after every message, so there is nothing
    # to flush, and a grace period or the interpreter's teardown of torch only delays the run's exit.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server process decides when workers stop
    threading.Thread(target=_watch_parent, args=(zygote_pid, server), daemon=True).start()   # gone already: 1 s
    report_line(report_fd, {"event": "port", "index": index, "pid": os.getpid(), "port": port})
    os.close(report_fd)
    server.wait_for_termination()
