"""Every private Flower API fedsim relies on, in one place, checked against the pinned version.

Flower 1.41 gives no public way to run a ServerApp outside its own runtimes, to serialize a
Message for fedsim's own transport, or to submit an app bundle without the ``flwr`` CLI. The
internals fedsim needs for that are reached only through this module, so an upgrade has one
file to audit. The contract test ``tests/unit/flower/test_compat.py`` exercises each one.

Private APIs used (module: what):

- ``flwr.supercore.task_identity.TaskIdentity``: the run/task/node identity ``Message()`` reads.
- ``flwr.common.constant``: ``SUPERLINK_NODE_ID`` and ``ErrorCode``.
- ``flwr.supercore.run.Run.create_empty``: the run object legacy Grid users read.
- ``Metadata.__dict__["_message_id"]``: message ids are assigned by a SuperLink; fedsim's own
  Grids assign them the same way Flower's in-memory grid does.
- ``flwr.common.serde`` (``message_to_proto``, ``message_from_proto``, ``recorddict_to_proto``,
  ``recorddict_from_proto``, ``fab_to_proto``, ``user_config_to_proto``) and the generated
  ``flwr.proto`` messages (``message_pb2.Message``, ``recorddict_pb2.RecordDict``,
  ``control_pb2.StartRunRequest / ListRunsRequest / StreamLogsRequest``).
- ``flwr.cli.build.build_fab_from_files``, ``flwr.cli.typing.SuperLinkConnection``,
  ``flwr.cli.utils.init_http_client_from_connection``: build a FAB in memory and open a
  Control API client.
- ``flwr.supercore.fab.Fab``, ``flwr.supercore.utils.simulation_config_from_json``: the
  StartRun request.
"""

from __future__ import annotations

from typing import Any, Mapping

import flwr
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedsim.errors import RunError

#: Flower's public app API as fedsim's engines use it: they import it from here, so that fedsim/flower/
#: is the only package that imports flwr.
PUBLIC_API = ("ClientApp", "Context", "Error", "Grid", "Message", "RecordDict", "ServerApp")

SUPPORTED = "1.41."

#: Error codes fedsim's own runtimes put in error replies (Flower's values).
CLIENT_EXCEPTION = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
NODE_UNAVAILABLE = ErrorCode.NODE_UNAVAILABLE


def check_version() -> None:
    """Refuse to run on a Flower minor version whose internals were not verified."""
    if not flwr.__version__.startswith(SUPPORTED):
        raise RunError(f"fedsim needs flwr {SUPPORTED}* (found {flwr.__version__}); "
                       "install with: pip install -c constraints.txt -e .")


# ------------------------------------------------------------------ running a ServerApp ourselves


def set_server_identity(run_id: int) -> None:
    """Make this process the SuperLink side of run ``run_id`` (``Message()`` reads this)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SUPERLINK_NODE_ID


def empty_run(run_id: int) -> Any:
    """An empty ``flwr.supercore.run.Run`` (legacy workflows read ``grid.run.run_id``)."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=run_id)


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give a message the id a SuperLink would (Flower's in-memory grid does the same)."""
    msg.metadata.__dict__["_message_id"] = message_id


# ------------------------------------------------------------------ wire format


def message_to_bytes(msg: Message) -> bytes:
    """A Message as Flower serializes it on the wire (protobuf)."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(msg).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """Parse :func:`message_to_bytes` output."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def message_nbytes(msg: Message) -> int:
    """Bytes of the message as Flower serializes it (protobuf)."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


def recorddict_to_bytes(records: RecordDict) -> bytes:
    """A RecordDict (a node's ``context.state``) as protobuf bytes."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(records).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """Parse :func:`recorddict_to_bytes` output."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# ------------------------------------------------------------------ Control API


def build_fab(files: Mapping[str, bytes]) -> bytes:
    """A FAB (Flower app bundle) built in memory from ``{path: content}``."""
    from flwr.cli.build import build_fab_from_files

    fab_bytes, _ = build_fab_from_files(dict(files))
    return fab_bytes


def control_client(address: str, root_certificates: str | None = None) -> Any:
    """A Control API client for ``address`` (insecure when no CA certificate is given)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    conn = SuperLinkConnection(name="fedsim", address=address, root_certificates=root_certificates,
                               insecure=root_certificates is None)
    return init_http_client_from_connection(conn)


def start_run_request(fab_bytes: bytes, digest: str, simulation: dict | None = None) -> Any:
    """The Control API ``StartRunRequest`` of a FAB (``simulation``: a simulation SuperLink's config)."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab
    from flwr.supercore.utils import simulation_config_from_json

    req = StartRunRequest(fab=fab_to_proto(Fab(digest, fab_bytes, {})), override_config=user_config_to_proto({}),
                          federation="", app_spec="")
    if simulation:
        req.override_federation_config.CopyFrom(simulation_config_from_json(simulation))
    return req


def list_runs_request(run_id: int) -> Any:
    """The Control API ``ListRunsRequest`` for one run."""
    from flwr.proto.control_pb2 import ListRunsRequest

    return ListRunsRequest(run_id=run_id)


def stream_logs_request(run_id: int) -> Any:
    """The Control API ``StreamLogsRequest`` for a run's whole log."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    return StreamLogsRequest(run_id=run_id, after_timestamp=0.0)
