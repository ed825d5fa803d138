"""Contract test of ``fedsim/flower/compat.py`` (the test named in its docstring) against the installed Flower.

Every function and constant in ``compat`` reaches a private Flower API. Each test below
drives one of them and checks the behaviour fedsim relies on, so a Flower upgrade that moves,
renames or changes one of these internals fails here, by name, instead of deep inside a run.
No network, no processes: the Control API client talks to an in-process fake transport.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import socket
import tomllib
import zipfile

import httpx
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedsim.engine.submit import app_pyproject
from fedsim.errors import RunError
from fedsim.flower import compat

RUN_CONFIG = {"fedsim.scenario": "{}", "fedsim.progress": "log"}
SIMULATION = {"num_supernodes": 2, "client_resources_num_cpus": 1, "client_resources_num_gpus": 0.0}


# ------------------------------------------------------------------ fixtures / helpers


@pytest.fixture
def identity():
    """Run the test as the SuperLink side of run 1; restore Flower's process-wide task identity after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: v for k, v in vars(TaskIdentity).items() if k.startswith("_") and not k.startswith("__")}
    compat.set_server_identity(1)
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


def _content() -> RecordDict:
    """What a fedsim train instruction carries: arrays, a config and metrics."""
    return RecordDict({
        "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                               "b": Array(np.array([-1, 0, 7], dtype=np.int64))}),
        "config": ConfigRecord({"server-round": 3, "lr": 0.05, "fedsim.scenario": '{"a": 1}', "resume": False,
                                "blob": b"\x00\xff", "steps": [1, 2, 3]}),
        "metrics": MetricRecord({"num-examples": 40, "loss": 0.25, "per-class": [0.1, 0.9]}),
    })


def _train_message(dst: int = 1001) -> Message:
    return Message(_content(), dst_node_id=dst, message_type=MessageType.TRAIN, group_id="3")


def _assert_content_equal(got: RecordDict, want: RecordDict) -> None:
    assert set(got) == set(want), "RecordDict keys changed on the round trip"
    for name in ("w", "b"):
        a, b = got["arrays"][name].numpy(), want["arrays"][name].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f"array {name!r} changed"
    assert list(got["arrays"]) == list(want["arrays"]), "ArrayRecord order not preserved"
    assert dict(got["config"]) == dict(want["config"])
    assert dict(got["metrics"]) == dict(want["metrics"])


def _self_signed_ca(tmp_path) -> str:
    """A throwaway CA certificate file (PEM), as a deployment's ``root_certificates``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim-test-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture
def fake_superlink(monkeypatch, tmp_path):
    """Answer Control API HTTP calls in-process; any real socket connect fails the test.

    Returns the list of ``httpx.Request`` objects the client sent.
    """
    from flwr.proto.control_pb2 import ListRunsResponse, StartRunResponse, StreamLogsResponse
    from flwr.proto.run_pb2 import Run as ProtoRun
    from flwr.proto.run_pb2 import RunStatus as ProtoRunStatus

    sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent.append(request)
        request.read()
        path = request.url.path
        if path.endswith("/start-run"):
            body, ctype = StartRunResponse(run_id=42).SerializeToString(), "application/protobuf"
        elif path.endswith("/list-runs"):
            run = ProtoRun(run_id=42, status=ProtoRunStatus(status="finished", sub_status="completed", details="ok"))
            body, ctype = ListRunsResponse(run_dict={42: run}).SerializeToString(), "application/protobuf"
        elif path.endswith("/stream-logs"):
            frames = [StreamLogsResponse(log_output=t, latest_timestamp=float(i)).SerializeToString()
                      for i, t in enumerate(["round 1\n", "round 2\n"], 1)]
            body = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
            ctype = "application/flower-protobuf-stream"
        else:
            return httpx.Response(404, request=request)
        return httpx.Response(200, headers={"content-type": ctype}, content=body, request=request)

    def no_connect(*args, **kwargs):
        raise AssertionError("the Control API client opened a network connection")

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", handle_request)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    # Keep the CLI's credential store (read when the client is built) out of the real ~/.flwr.
    monkeypatch.setattr("flwr.supercore.credential_store.file_credential_store.CREDENTIAL_FILE_PATH",
                        tmp_path / "credentials.yaml", raising=False)
    return sent


# ------------------------------------------------------------------ version guard and constants


def test_check_version_accepts_installed_flower():
    """Catches: the pin and ``compat.SUPPORTED`` drifting apart (installed Flower is not the verified minor)."""
    import flwr

    assert flwr.__version__.startswith(compat.SUPPORTED), (
        f"installed flwr {flwr.__version__} is not the verified {compat.SUPPORTED}*: audit compat.py first")
    compat.check_version()


def test_check_version_refuses_unverified_minor(monkeypatch):
    """Catches: the guard no longer reading ``flwr.__version__`` (an unverified Flower would run unchecked)."""
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    with pytest.raises(RunError, match=r"1\.99\.0"):
        compat.check_version()


def test_error_codes_are_flowers():
    """Catches: ``flwr.common.constant.ErrorCode`` renaming or renumbering the codes fedsim puts in replies."""
    assert compat.CLIENT_EXCEPTION == getattr(ErrorCode, "CLIENT_APP_RAISED_EXCEPTION")
    assert compat.NODE_UNAVAILABLE == getattr(ErrorCode, "NODE_UNAVAILABLE")
    assert isinstance(compat.CLIENT_EXCEPTION, int) and isinstance(compat.NODE_UNAVAILABLE, int)
    assert compat.CLIENT_EXCEPTION != compat.NODE_UNAVAILABLE


# ------------------------------------------------------------------ running a ServerApp ourselves


@pytest.mark.usefixtures("identity")
def test_set_server_identity_is_what_message_reads():
    """Catches: ``TaskIdentity`` moving, or ``Message()`` no longer taking run/src node from it."""
    compat.set_server_identity(7)
    msg = _train_message()
    assert msg.metadata.run_id == 7
    assert msg.metadata.src_node_id == SUPERLINK_NODE_ID
    assert msg.metadata.dst_node_id == 1001


def test_empty_run_has_the_run_id():
    """Catches: ``Run.create_empty`` moving or changing signature (legacy workflows read ``grid.run.run_id``)."""
    from flwr.supercore.run import Run

    run = compat.empty_run(7)
    assert isinstance(run, Run)
    assert run.run_id == 7


@pytest.mark.usefixtures("identity")
def test_assign_message_id_is_what_metadata_and_replies_read():
    """Catches: ``Metadata`` no longer storing the id in ``__dict__["_message_id"]`` (replies unmatched)."""
    msg = _train_message()
    assert msg.metadata.message_id == ""
    compat.assign_message_id(msg, "abc123")
    assert msg.metadata.message_id == "abc123"
    # LocalGrid matches replies to instructions by reply_to_message_id, also across the wire.
    assert Message(RecordDict(), reply_to=msg).metadata.reply_to_message_id == "abc123"
    back = compat.message_from_bytes(compat.message_to_bytes(msg))
    assert back.metadata.message_id == "abc123"
    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=back)
    assert compat.message_from_bytes(compat.message_to_bytes(reply)).metadata.reply_to_message_id == "abc123"


# ------------------------------------------------------------------ wire format


@pytest.mark.usefixtures("identity")
def test_message_round_trip_keeps_content_and_metadata():
    """Catches: ``serde.message_to_proto/message_from_proto`` or ``message_pb2.Message`` moving or losing data."""
    msg = _train_message()
    compat.assign_message_id(msg, "m-1")
    data = compat.message_to_bytes(msg)
    assert isinstance(data, bytes) and data
    back = compat.message_from_bytes(data)
    assert isinstance(back, Message)
    assert back.has_content() and not back.has_error()
    _assert_content_equal(back.content, msg.content)
    for field in ("run_id", "message_id", "src_node_id", "dst_node_id", "group_id", "message_type",
                  "created_at", "ttl"):
        assert getattr(back.metadata, field) == getattr(msg.metadata, field), f"metadata.{field} changed"


@pytest.mark.usefixtures("identity")
def test_error_reply_round_trip():
    """Catches: error replies (``Message(Error, reply_to=)``) losing their code, reason or reply id on the wire."""
    msg = _train_message(dst=1003)
    compat.assign_message_id(msg, "m-2")
    instr = compat.message_from_bytes(compat.message_to_bytes(msg))    # what a worker receives
    reply = Message(Error(code=compat.CLIENT_EXCEPTION, reason="ValueError: boom"), reply_to=instr)
    back = compat.message_from_bytes(compat.message_to_bytes(reply))
    assert back.has_error() and not back.has_content()
    assert back.error.code == compat.CLIENT_EXCEPTION
    assert back.error.reason == "ValueError: boom"
    assert back.metadata.reply_to_message_id == "m-2"
    assert back.metadata.src_node_id == 1003
    assert back.metadata.dst_node_id == SUPERLINK_NODE_ID
    assert back.metadata.message_type == MessageType.TRAIN


@pytest.mark.usefixtures("identity")
def test_message_nbytes_is_the_serialized_size():
    """Catches: ``message_to_proto(...).ByteSize()`` disagreeing with what is actually sent."""
    msg = _train_message()
    assert compat.message_nbytes(msg) == len(compat.message_to_bytes(msg))
    bigger = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10_000, np.float32))})}),
                     dst_node_id=1001, message_type=MessageType.TRAIN)
    assert compat.message_nbytes(bigger) == len(compat.message_to_bytes(bigger)) >= 40_000


def test_recorddict_round_trip():
    """Catches: ``serde.recorddict_to_proto/from_proto`` or ``recorddict_pb2.RecordDict`` moving (node state)."""
    state = _content()
    data = compat.recorddict_to_bytes(state)
    assert isinstance(data, bytes) and data
    back = compat.recorddict_from_bytes(data)
    assert isinstance(back, RecordDict)
    _assert_content_equal(back, state)
    empty = compat.recorddict_from_bytes(compat.recorddict_to_bytes(RecordDict()))
    assert isinstance(empty, RecordDict) and len(empty) == 0


# ------------------------------------------------------------------ Control API


def test_build_fab_holds_the_pyproject():
    """Catches: ``flwr.cli.build.build_fab_from_files`` moving, changing its return, or rejecting fedsim's app."""
    pyproject = app_pyproject(RUN_CONFIG)
    fab = compat.build_fab({"pyproject.toml": pyproject})
    assert isinstance(fab, bytes)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        names = z.namelist()
        assert "pyproject.toml" in names
        packed = z.read("pyproject.toml")
        manifest = z.read(".info/CONTENT").decode() if ".info/CONTENT" in names else ""
    assert tomllib.loads(packed.decode()) == tomllib.loads(pyproject.decode()), "FAB changed the app config"
    if manifest:
        assert f"pyproject.toml,{hashlib.sha256(packed).hexdigest()}," in manifest
    # submit identifies the app by sha256(fab): the same app must give the same bytes.
    assert compat.build_fab({"pyproject.toml": pyproject}) == fab


def test_start_run_request_holds_the_fab():
    """Catches: ``StartRunRequest``, ``Fab`` or ``serde.fab_to_proto/user_config_to_proto`` changing fields."""
    from flwr.proto.control_pb2 import StartRunRequest

    fab = compat.build_fab({"pyproject.toml": app_pyproject(RUN_CONFIG)})
    digest = hashlib.sha256(fab).hexdigest()
    req = compat.start_run_request(fab, digest)
    assert isinstance(req, StartRunRequest)
    assert req.fab.hash_str == digest
    assert req.fab.content == fab
    assert dict(req.override_config) == {}
    assert req.federation == "" and req.app_spec == ""
    assert not req.HasField("override_federation_config")
    assert StartRunRequest.FromString(req.SerializeToString()) == req


def test_start_run_request_with_simulation_config():
    """Catches: ``simulation_config_from_json`` or the ``override_federation_config`` field changing."""
    fab = compat.build_fab({"pyproject.toml": app_pyproject(RUN_CONFIG)})
    req = compat.start_run_request(fab, "d" * 64, SIMULATION)
    assert req.HasField("override_federation_config")
    sim = req.override_federation_config
    assert sim.num_supernodes == 2
    assert sim.client_resources_num_cpus == 1
    assert sim.client_resources_num_gpus == 0.0
    half = compat.start_run_request(fab, "d" * 64, {**SIMULATION, "client_resources_num_gpus": 0.5})
    assert half.override_federation_config.client_resources_num_gpus == pytest.approx(0.5)
    assert req.fab.hash_str == "d" * 64 and req.fab.content == fab


def test_list_runs_request():
    """Catches: ``control_pb2.ListRunsRequest`` moving or renaming ``run_id``."""
    from flwr.proto.control_pb2 import ListRunsRequest

    req = compat.list_runs_request(5)
    assert isinstance(req, ListRunsRequest)
    assert req.run_id == 5


def test_stream_logs_request_starts_at_the_beginning():
    """Catches: ``control_pb2.StreamLogsRequest`` moving or renaming ``run_id``/``after_timestamp``."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    req = compat.stream_logs_request(5)
    assert isinstance(req, StreamLogsRequest)
    assert req.run_id == 5
    assert req.after_timestamp == 0.0


def test_control_client_builds_without_connecting(fake_superlink):
    """Catches: ``SuperLinkConnection``/``init_http_client_from_connection`` moving, changing, or connecting."""
    client = compat.control_client("127.0.0.1:1")
    try:
        for rpc in ("StartRun", "ListRuns", "StreamLogs"):
            assert callable(getattr(client, rpc, None)), f"Control API client has no {rpc}"
        assert fake_superlink == [], "building the client sent a request"
    finally:
        client.close()


def test_control_client_speaks_the_calls_fedsim_makes(fake_superlink):
    """Catches: the client's StartRun/ListRuns/StreamLogs no longer taking compat's requests or their answers."""
    client = compat.control_client("127.0.0.1:1")
    try:
        fab = compat.build_fab({"pyproject.toml": app_pyproject(RUN_CONFIG)})
        assert client.StartRun(compat.start_run_request(fab, hashlib.sha256(fab).hexdigest(), SIMULATION)).run_id == 42
        status = client.ListRuns(compat.list_runs_request(42)).run_dict[42].status
        assert (status.status, status.sub_status, status.details) == ("finished", "completed", "ok")
        logs = [res.log_output for res in client.StreamLogs(compat.stream_logs_request(42))]
        assert logs == ["round 1\n", "round 2\n"]
    finally:
        client.close()
    urls = [str(r.url) for r in fake_superlink]
    assert len(urls) == 3 and all(u.startswith("http://127.0.0.1:1/") for u in urls), urls


def test_control_client_with_root_certificates_uses_tls(fake_superlink, tmp_path):
    """Catches: Flower refusing or ignoring a CA file with ``insecure=False`` (TLS to a remote SuperLink)."""
    client = compat.control_client("127.0.0.1:1", root_certificates=_self_signed_ca(tmp_path))
    try:
        assert client.ListRuns(compat.list_runs_request(42)).run_dict[42].status.status == "finished"
    finally:
        client.close()
    assert [r.url.scheme for r in fake_superlink] == ["https"]
