"""The in-process engine: a Flower ``Grid`` that calls the ClientApp in the server's process.

It is the reference semantics every other engine must match. Each message is serialized
to protobuf and parsed back (as a real runtime would), so clients can never share
objects with the server, and the measured bytes are the real ones. Clients see a
read-only run config; a client exception becomes an error reply, never a crash.

The few private Flower touch points are here and in ``fedsim/flower/compat.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.flower.codec import roundtrip
from fedsim.flower.compat import set_server_identity
from fedsim.flower.grid_base import LocalGrid
from fedsim.flower.state_store import load_state, save_state

#: Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION.
CLIENT_EXCEPTION = 1


class InProcessGrid(LocalGrid):
    """A Grid with ``num_nodes`` virtual nodes, each a ClientApp call with its own Context."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1,
                 state_dir: Path | None = None):
        super().__init__(num_nodes, run_id)
        self.client_app, self.state_dir = client_app, state_dir
        frozen = MappingProxyType(dict(run_config))
        self.contexts = {nid: Context(run_id=run_id, node_id=nid,
                                      node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=load_state(state_dir, nid), run_config=frozen)  # type: ignore[arg-type]
                         for i, nid in enumerate(self.get_node_ids())}

    def _deliver(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """Call the ClientApp for each message in turn (deadlines do not apply in one process)."""
        return [self._handle(m) for m in msgs]

    def _handle(self, msg: Message) -> Message:
        inbound, _ = roundtrip(msg)
        context = self.contexts[inbound.metadata.dst_node_id]
        try:
            reply = self.client_app(inbound, context)
        except Exception as exc:  # a crashing client becomes an error reply, as in a real runtime
            reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=inbound)
        save_state(self.state_dir, context.node_id, context.state)   # as the workers do: same results on resume
        return roundtrip(reply)[0]


def run_server_app(server_app: ServerApp, grid: Grid, run_config: dict) -> None:
    """Run a ServerApp in this process against ``grid`` (in-process nodes or the worker pool)."""
    set_server_identity(run_id=1)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict,
                  state_dir: Path | None = None) -> None:
    """Run a ServerApp against ``num_nodes`` in-process client nodes (client state under ``state_dir``)."""
    set_server_identity(run_id=1)
    run_server_app(server_app, InProcessGrid(client_app, num_nodes, run_config, state_dir=state_dir), run_config)
