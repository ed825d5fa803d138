"""ClientApps used by the worker tests (imported inside worker processes via ``fedsim.client-app``)."""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsim.flower.client import handle_train

#: Counts training messages per node in ``context.state``, and reports the count as a metric.
stateful = ClientApp()


@stateful.train()
def _stateful_train(msg: Message, context: Context) -> Message:
    seen = context.state.get("fixture", ConfigRecord({"count": 0}))
    count = int(seen["count"]) + 1
    context.state["fixture"] = ConfigRecord({"count": count})
    reply = handle_train(msg, context)
    reply.content["metrics"]["calls"] = count
    if os.environ.get("FIXTURE_DIE_ON_ROUND") == str(msg.content["config"]["server-round"]) and \
            os.environ.get("FEDSIM_WORKER_INDEX") == "0":
        os._exit(3)   # a hard crash: no reply, no cleanup
    return reply
