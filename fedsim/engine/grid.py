"""What fedsim's own Grids share: one run, node ids from ``NODE_ID_BASE``, replies kept until pulled."""

from __future__ import annotations

import uuid
from typing import Iterable


from fedsim.flower.compat import Grid, Message, RecordDict, assign_message_id, empty_run

#: Virtual node ids start here (Flower reserves small ids such as SUPERLINK_NODE_ID = 1).
NODE_ID_BASE = 1_000


class LocalGrid(Grid):
    """A Grid whose ``num_nodes`` nodes are virtual clients ``0..num_nodes-1`` (node = base + client).

    Subclasses deliver messages in :meth:`_deliver` and return the replies.
    """

    def __init__(self, num_nodes: int, run_id: int = 1):
        self.num_nodes = num_nodes
        self._replies: dict[str, Message] = {}
        self._run = empty_run(run_id)
        self._events: list[str] = []

    def take_events(self) -> list[str]:
        """What happened to the grid's processes since the last call (a worker died, was restarted):
        the server loop puts these lines in the round's progress line and ``metrics.jsonl``."""
        out, self._events = self._events, []
        return out

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Grid API: a local grid has exactly one run."""

    @property
    def run(self):  # type: ignore[override]
        """Grid API: the current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Grid API (deprecated in Flower): build a message."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """One node per virtual client."""
        return [NODE_ID_BASE + c for c in range(self.num_nodes)]

    def push_messages(self, messages: Iterable[Message], timeout: float | None = None) -> list[str]:
        """Give each message an id (a SuperLink would), deliver them, and keep the replies until pulled."""
        msgs = list(messages)
        for msg in msgs:
            assign_message_id(msg, uuid.uuid4().hex)      # a SuperLink would assign it
        for reply in self._deliver(msgs, timeout):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in msgs]

    def _deliver(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies to the given message ids (those that have arrived)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then pull every reply (or its error reply) within ``timeout`` seconds."""
        return self.pull_messages(self.push_messages(messages, timeout))
