"""The in-process engine: a Flower ``Grid`` that calls the ClientApp in the server's process.

It is the reference semantics every other engine must match. Each message is serialized
to protobuf and parsed back (as a real runtime would), so clients can never share
objects with the server, and the measured bytes are the real ones. Clients see a
read-only run config; a client exception becomes an error reply, never a crash.

The few private Flower touch points are here and in ``fedsim/flower/compat.py``.
"""

from __future__ import annotations

import uuid
from types import MappingProxyType
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.flower.compat import empty_run, set_server_identity

#: Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION.
CLIENT_EXCEPTION = 1

#: Virtual node ids start here (Flower reserves small ids such as SUPERLINK_NODE_ID = 1).
NODE_ID_BASE = 1_000


class InProcessGrid(Grid):
    """A Grid with ``num_nodes`` virtual nodes, each a ClientApp call with its own Context."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1):
        self.client_app = client_app
        self.node_ids = [NODE_ID_BASE + i for i in range(num_nodes)]
        frozen = MappingProxyType(dict(run_config))
        self.contexts = {nid: Context(run_id=run_id, node_id=nid,
                                      node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config=frozen)  # type: ignore[arg-type]
                         for i, nid in enumerate(self.node_ids)}
        self._replies: dict[str, Message] = {}
        self._run = empty_run(run_id)
        self.bytes_sent = self.bytes_received = 0

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Grid API: the in-process grid has exactly one run."""

    @property
    def run(self):  # type: ignore[override]
        """Grid API: the current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Grid API (deprecated in Flower): build a message."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The virtual node ids."""
        return list(self.node_ids)

    def _handle(self, msg: Message) -> Message:
        from fedsim.flower.codec import roundtrip
        inbound, nbytes = roundtrip(msg)
        self.bytes_sent += nbytes
        try:
            reply = self.client_app(inbound, self.contexts[inbound.metadata.dst_node_id])
        except Exception as exc:  # a crashing client becomes an error reply, as in a real runtime
            reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=inbound)
        reply, nbytes = roundtrip(reply)
        self.bytes_received += nbytes
        return reply

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver messages (sequentially) and keep the replies until pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[msg.metadata.message_id] = self._handle(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies to the given message ids."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then pull everything (clients run synchronously here)."""
        return self.pull_messages(self.push_messages(messages))


def run_server_app(server_app: ServerApp, grid: Grid, run_config: dict) -> None:
    """Run a ServerApp in this process against ``grid`` (in-process nodes or the worker pool)."""
    set_server_identity(run_id=1)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict) -> None:
    """Run a ServerApp against ``num_nodes`` in-process client nodes."""
    set_server_identity(run_id=1)
    run_server_app(server_app, InProcessGrid(client_app, num_nodes, run_config), run_config)
