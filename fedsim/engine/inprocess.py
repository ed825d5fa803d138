"""``engine: inprocess`` — the ServerApp and the ClientApp in one process (the reference runtime).

A Flower ``Grid`` that calls the ClientApp in the server's process. It is the reference
semantics every other engine must match. Each message is serialized to protobuf and parsed
back (as a real runtime would), so clients can never share objects with the server, and
the measured bytes are the real ones. Clients see a read-only run config; a client exception
becomes an error reply, never a crash. Client state (``context.state``) is kept on disk
exactly as the worker engine keeps it, so resumed runs agree across engines.

The private Flower touch points are listed in ``fedsim/flower/compat.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType


from fedsim.engine.grid import LocalGrid
from fedsim.flower.codec import roundtrip
from fedsim.flower.compat import (CLIENT_EXCEPTION, ClientApp, Context, Error, Grid, Message, RecordDict, ServerApp,
                                  set_server_identity)
from fedsim.flower.state_store import load_state, save_state
from fedsim.scenario import Scenario


class InProcessGrid(LocalGrid):
    """A Grid with ``num_nodes`` virtual nodes, each a ClientApp call with its own Context.

    A node's Context is created on its first message, from the state on disk: a resumed run
    restores the client-state snapshot before any message is sent.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1,
                 state_dir: Path | None = None):
        super().__init__(num_nodes, run_id)
        self.client_app, self.state_dir = client_app, state_dir
        self.run_config = MappingProxyType(dict(run_config))
        self.contexts: dict[int, Context] = {}

    def _context(self, node_id: int) -> Context:
        if node_id not in self.contexts:
            index = node_id - self.get_node_ids()[0]
            self.contexts[node_id] = Context(run_id=self.run.run_id, node_id=node_id,
                                             node_config={"partition-id": index, "num-partitions": self.num_nodes},
                                             state=load_state(self.state_dir, node_id),
                                             run_config=self.run_config)  # type: ignore[arg-type]
        return self.contexts[node_id]

    def _deliver(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """Call the ClientApp for each message in turn (deadlines do not apply in one process)."""
        return [self._handle(m) for m in msgs]

    def _handle(self, msg: Message) -> Message:
        inbound, _ = roundtrip(msg)
        context = self._context(inbound.metadata.dst_node_id)
        try:
            reply = self.client_app(inbound, context)
        except Exception as exc:  # a crashing client becomes an error reply, as in a real runtime
            reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=inbound)
        save_state(self.state_dir, context.node_id, context.state)
        return roundtrip(reply)[0]


def run_server_app(server_app: ServerApp, grid: Grid, run_config: dict) -> None:
    """Run a ServerApp in this process against ``grid`` (in-process nodes or the worker pool)."""
    set_server_identity(run_id=1)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))


def run(scenario: Scenario, out_dir: Path, *, progress: str = "auto", resume: bool = False,
        force: bool = False) -> None:
    """Run ``scenario`` with one virtual Flower node per client."""
    import torch

    from clients.app import app as client_app
    from fedsim.federation import get_federation
    from fedsim.flower.codec import make_run_config
    from fedsim.flower.compat import check_version
    from server.app import app as server_app

    check_version()
    torch.set_num_threads(1)
    run_config = make_run_config(scenario, out_dir, progress, resume, force)
    num_nodes = get_federation(scenario).num_clients
    grid = InProcessGrid(client_app, num_nodes, run_config, state_dir=out_dir / "client_state")
    run_server_app(server_app, grid, run_config)
