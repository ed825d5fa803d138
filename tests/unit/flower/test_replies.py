"""Every reply is untrusted: bad ones are rejected per client with a reason; the round goes on.

The first tests run whole rounds with a misbehaving ClientApp; the rest hand-craft single replies
(what a hostile client can put on the wire) and check each rejection's kind."""

from __future__ import annotations

import io

import numpy as np
import pytest
from safetensors.numpy import load_file
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.core.server import ArraySpec
from fedsim.flower.client import handle_train
from fedsim.flower.codec import OUT_DIR_KEY, PROGRESS_KEY, SCENARIO_KEY, from_record, scenario_to_config, to_record
from fedsim.flower.compat import assign_message_id, set_server_identity
from fedsim.flower.replies import (KINDS, MAX_COUNT, Accepted, Expectation, Rejected, ReplyError, check_metrics,
                                   check_reply, count_kinds, reason_kind)
from fedsim.engine.inprocess import InProcessGrid
from fedsim.flower.runner import ServerLoop
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario


def _corrupt(msg: Message, reply: Message, how: str) -> Message:
    arrays = from_record(reply.content["arrays"])
    metrics = dict(reply.content["metrics"])
    first = next(iter(arrays))
    if how == "nan":
        arrays[first] = arrays[first].copy()
        arrays[first].flat[0] = np.nan
    elif how == "shape":
        arrays[first] = np.zeros((1,), arrays[first].dtype)      # broadcastable: Flower would broadcast it
    elif how == "scalar":
        arrays[first] = np.zeros((), arrays[first].dtype)
    elif how == "dtype":
        arrays[first] = arrays[first].astype(np.float64)
    elif how == "missing":
        arrays.pop(first)
    elif how == "round":
        metrics["server-round"] = 99
    elif how == "weight":
        metrics["num-examples"] = -5
    elif how == "huge_weight":
        metrics["num-examples"] = 10 ** 12
    elif how == "loss_list":
        metrics["train_loss"] = [1.0, 2.0]
    elif how == "negative_time":
        metrics["compute_s"] = -1.0
    record = MetricRecord({k: v for k, v in metrics.items()})
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": record}),
                   reply_to=msg)


def misbehaving_app(bad: dict[int, str]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(msg.content["config"]["client-id"])
        if bad.get(cid) == "raise":
            raise RuntimeError("client exploded")
        reply = handle_train(msg, context)
        return _corrupt(msg, reply, bad[cid]) if cid in bad else reply
    return app


def run_with(app: ClientApp, text: str, out) -> tuple[ServerLoop, list[dict]]:
    scn = parse_scenario(text)
    set_server_identity(1)
    run_config = {SCENARIO_KEY: scenario_to_config(scn), OUT_DIR_KEY: str(out), PROGRESS_KEY: "none"}
    loop = ServerLoop(scn, out, "none")
    loop.run(InProcessGrid(app, loop.fed.num_clients, run_config))
    return loop, read_metrics(out)


ALL_CLIENTS = "clients_per_round: 3"


@pytest.mark.parametrize("how,reason", [("nan", "NaN"), ("shape", "expected float32"), ("dtype", "float64"),
                                        ("scalar", "broadcastable"),
                                        ("missing", "missing"), ("round", "not 1"), ("weight", "positive integer"),
                                        ("raise", "client exploded"), ("loss_list", "'train_loss' must be a finite"),
                                        ("negative_time", "'compute_s' must be >= 0")])
def test_bad_reply_rejected_round_continues(tmp_path, tiny_yaml, how, reason):
    scn = parse_scenario(tiny_yaml)
    from fedsim.federation import get_federation
    victim = get_federation(scn).sample_clients(1)[0]
    loop, rows = run_with(misbehaving_app({victim: how}), tiny_yaml, tmp_path)
    assert rows[0]["rejected"] >= 1 and rows[0]["clients"] == 3 - rows[0]["rejected"]
    assert any(reason in r for r in rows[0]["rejected_reasons"]), rows[0]["rejected_reasons"]
    assert rows[0]["rejected_reasons"][0].startswith(f"client {victim}:")   # error replies too (by node)
    assert len(rows) == 3 and all(np.isfinite(r["eval_loss"]) for r in rows)


def test_client_reported_weight_is_clamped_to_its_partition(tmp_path, tiny_yaml):
    """A client claiming 10^12 examples weighs no more than the examples it was given."""
    scn = parse_scenario(tiny_yaml)
    from fedsim.federation import get_federation
    fed = get_federation(scn)
    victim = fed.sample_clients(1)[0]
    honest, _ = run_with(misbehaving_app({}), tiny_yaml, tmp_path / "honest")
    liar, rows = run_with(misbehaving_app({victim: "huge_weight"}), tiny_yaml, tmp_path / "liar")
    assert rows[0]["rejected"] == 0
    a = load_file(str(tmp_path / "honest" / "model.safetensors"))
    b = load_file(str(tmp_path / "liar" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_no_accepted_reply_keeps_the_model_and_fails_the_run(tmp_path, tiny_yaml):
    from fedsim.errors import RunError
    text = tiny_yaml.replace("rounds: 3", "rounds: 2")
    with pytest.raises(RunError, match="no client reply was accepted in any round"):
        run_with(misbehaving_app({c: "raise" for c in range(6)}), text, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["clients"] for r in rows] == [0, 0] and all("lr_global" in r for r in rows)
    assert rows[0]["eval_loss"] == rows[1]["eval_loss"]


# ------------------------------------------------------------- one reply at a time, crafted by hand
SPEC = {"w": ArraySpec((4,), np.dtype(np.float32)), "b": ArraySpec((2,), np.dtype(np.float32))}
GOOD = {"w": np.arange(4, dtype=np.float32), "b": np.ones(2, np.float32)}
METRICS = {"num-examples": 5, "train_loss": 0.5, "compute_s": 0.1, "lr_local": 0.1, "steps": 3}


def _sent(cid: int, node: int | None = None, mid: str | None = None) -> Message:
    """The TRAIN message the server sent to ``cid`` (on ``node``, default 1000 + cid)."""
    set_server_identity(1)
    msg = Message(RecordDict(), dst_node_id=1000 + cid if node is None else node, message_type="train")
    assign_message_id(msg, mid or f"m{cid}")
    return msg


def _answer(cid: int, arrays=None, sent: Message | None = None, **metrics) -> Message:
    """A reply from ``cid``: ``arrays`` (named numpy arrays or a ready ArrayRecord), metrics overridden."""
    rec = arrays if isinstance(arrays, ArrayRecord) else to_record(GOOD if arrays is None else arrays)
    values = {**METRICS, "client-id": cid, "server-round": 1, **metrics}
    return Message(RecordDict({"arrays": rec, "metrics": MetricRecord({k: v for k, v in values.items()
                                                                        if v is not None})}),
                   reply_to=sent or _sent(cid))


def _exp(n: int = 4, node_of=None) -> Expectation:
    return Expectation(1, node_of or {c: 1000 + c for c in range(n)}, {c: 5 for c in range(n)}, 1 << 30,
                       SPEC, {}, {}, ("train_loss", "compute_s", "lr_local"))


def _raw(name_to_array: dict) -> ArrayRecord:
    """An ArrayRecord of Arrays built field by field (what a hostile client can put on the wire)."""
    return ArrayRecord({k: v for k, v in name_to_array.items()})


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _rejected(msg: Message, exp: Expectation | None = None) -> Rejected:
    out = check_reply(msg, exp or _exp())
    assert isinstance(out, Rejected), out
    assert out.kind in KINDS and reason_kind(out.reason) == out.kind, (out.kind, out.reason)
    assert reason_kind(f"client {out.cid}: {out.reason}") == out.kind         # as metrics.jsonl writes it
    return out


@pytest.mark.parametrize("bad", [np.zeros((1, 4), np.float32), np.zeros((), np.float32), np.zeros((1,), np.float32),
                                 np.zeros((4, 1), np.float32), np.zeros((8,), np.float32)],
                         ids=["row (1,n)", "scalar", "(1,)", "column (n,1)", "too long"])
def test_shape_must_equal_the_spec_not_merely_broadcast_to_it(bad):
    """Catches a shape check that accepts anything numpy would broadcast ((1, n), (n, 1), a scalar,
    (1,)): the mean would silently spread one value over the whole tensor or grow a dimension."""
    out = _rejected(_answer(0, {"w": bad, "b": GOOD["b"]}))
    assert out.kind == "shape" and out.cid == 0 and "'w'" in out.reason
    broadcastable = bad.shape != (8,)
    assert ("broadcastable" in out.reason) == broadcastable, out.reason


@pytest.mark.parametrize("declared,data", [
    ("object", _npy(np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)),
    ("<U3", _npy(np.array(["a", "b", "c", "d"]))),
    ("complex64", _npy(np.zeros(4, np.complex64))),
    ("not-a-dtype", _npy(np.zeros(4, np.float32))),
], ids=["object (pickle)", "unicode", "complex", "garbage"])
def test_non_numeric_and_object_arrays_are_rejected_from_their_metadata(declared, data, monkeypatch):
    """Catches object/pickled arrays or strings reaching np.load or the mean (IN-7), and an unknown
    dtype string crashing the server; none of them is even decoded."""
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("decoded a non-numeric array"))
    rec = _raw({"w": Array(dtype=declared, shape=(4,), stype="numpy.ndarray", data=data),
                "b": Array(GOOD["b"])})
    out = _rejected(_answer(0, rec))
    assert out.kind == "dtype" and "'w'" in out.reason


def test_metadata_that_lies_about_the_data_is_caught_after_decoding():
    """Catches trusting the Array's declared dtype/shape: the data of a pickled object array (or
    of another dtype or shape) behind float32[4] metadata is rejected, and the server never unpickles."""
    pickled = Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                    data=_npy(np.array([object()] * 4, dtype=object), allow_pickle=True))
    assert _rejected(_answer(0, _raw({"w": pickled, "b": Array(GOOD["b"])}))).kind == "decode"
    wider = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=_npy(np.zeros(4, np.float16)))
    assert _rejected(_answer(1, _raw({"w": wider, "b": Array(GOOD["b"])}))).kind == "dtype"
    garbage = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
    assert _rejected(_answer(2, _raw({"w": garbage, "b": Array(GOOD["b"])}))).kind == "decode"
    torch_like = Array(dtype="float32", shape=(4,), stype="torch.Tensor", data=_npy(GOOD["w"]))
    assert _rejected(_answer(3, _raw({"w": torch_like, "b": Array(GOOD["b"])}))).kind == "decode"


def test_oversized_arrays_are_rejected_before_any_is_decoded(monkeypatch):
    """IN-6: an array whose data is 100x what its (correct-looking) metadata says is rejected on
    the records' byte size, with no decoding. Catches a size check after ``numpy()`` (the memory
    is spent) or one that trusts the declared shape."""
    decoded = []
    real = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(1) or real(self))
    big = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=_npy(np.zeros(400, np.float32)))
    out = _rejected(_answer(0, _raw({"w": big, "b": Array(GOOD["b"])})))
    assert out.kind == "oversize" and "not decoded" in out.reason and decoded == []
    assert isinstance(check_reply(_answer(1), _exp()), Accepted) and len(decoded) == 2    # an honest one is decoded


def test_the_array_byte_budget_is_the_specs_plus_a_margin():
    """Catches a budget so tight that an honest reply is rejected, or so loose (the old 4x model
    bytes) that a 2x payload passes: 10 % plus 256 header bytes per array."""
    exp = _exp()
    assert exp.max_array_bytes() == int(1.1 * (4 + 2) * 4) + 2 * 256
    assert isinstance(check_reply(_answer(0, {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}), exp),
                      Accepted)


def test_duplicates_keep_the_first_reply_and_reject_the_rest():
    """IN-8: a second reply for a client is rejected even when the first failed a later check (no
    retrying until garbage passes), and a replayed reply to one message under another client id
    of the same node is rejected. Catches marking clients seen only on acceptance, and a guard
    that checks client ids but not the message a reply answers."""
    exp = _exp()
    first = _rejected(_answer(0, {"w": np.full(4, np.nan, np.float32), "b": GOOD["b"]}), exp)
    assert first.kind == "nonfinite"
    again = _rejected(_answer(0), exp)
    assert again.kind == "duplicate" and again.reason == "duplicate reply for client 0"
    node_of = {0: 1000, 2: 1000}                     # one node serves clients 0 and 2
    exp = _exp(node_of=node_of)
    sent0 = _sent(0, node=1000, mid="to-0")
    assert isinstance(check_reply(_answer(0, sent=sent0), exp), Accepted)
    replay = _rejected(_answer(2, sent=sent0), exp)
    assert replay.kind == "duplicate" and "to-0" in replay.reason
    assert isinstance(check_reply(_answer(2, sent=_sent(2, node=1000, mid="to-2")), exp), Accepted)


def test_a_stale_or_forged_first_reply_does_not_block_the_real_one():
    """Catches marking a client seen before its origin is verified: a reply for another round, or
    from another node, would otherwise lock the honest client out of the round."""
    exp = _exp()
    assert _rejected(_answer(1, **{"server-round": 0}), exp).kind == "stale"       # an earlier round's, late
    assert _rejected(_answer(1, **{"server-round": 5}), exp).kind == "round"
    assert _rejected(_answer(1, sent=_sent(1, node=1003, mid="x")), exp).kind == "sender"
    assert isinstance(check_reply(_answer(1), exp), Accepted)


@pytest.mark.parametrize("override", [
    {"train_loss": float("nan")}, {"compute_s": float("inf")}, {"compute_s": -1.0},
    {"num-examples": MAX_COUNT + 1}, {"num-examples": -5}, {"num-examples": 0}, {"num-examples": 2.5},
    {"steps": -1}, {"steps": 1e13}, {"steps": 2.5}, {"steps": float("nan")}, {"dp_steps_total": -3},
    {"train_loss": None}, {"lr_local": [0.1, 0.2]},
], ids=lambda o: f"{next(iter(o))}={next(iter(o.values()))!r}")
def test_absurd_metrics_are_rejected(override):
    """IN-4: non-finite required metrics, negative or absurdly large counters (10^12+), fractional
    counts, lists where scalars are due. Catches a check that only covers num-examples, or that
    lets a NaN loss or a negative step count into the round's row."""
    assert _rejected(_answer(0, **override)).kind == "metrics"


@pytest.mark.parametrize("name,value,kind", [("num-examples", True, "metrics"), ("client-id", True, "sender"),
                                             ("server-round", True, "round"), ("train_loss", "0.5", "decode"),
                                             ("steps", "3", "decode")])
def test_booleans_and_strings_are_not_numbers(name, value, kind):
    """Catches ``isinstance(True, int)``: a boolean client id would pass as client 1, a boolean round
    as round 1, a boolean count as one example. (Flower's MetricRecord refuses such values when
    built, so they are put in behind its back, as a hand-made message could; a string cannot even
    be serialized, so it is rejected there, and the metrics check refuses it as well.)"""
    msg = _answer(1)
    msg.content["metrics"].__dict__["_data"][name] = value
    out = check_reply(msg, _exp())
    assert isinstance(out, Rejected) and out.kind == kind and reason_kind(out.reason) == kind, out
    with pytest.raises(ReplyError, match="train_loss|steps|num-examples"):
        check_metrics({**METRICS, name: value} if name != "client-id" and name != "server-round"
                      else {**METRICS, "num-examples": True}, ("train_loss",))


def test_optional_metrics_may_be_infinite_and_counters_at_the_cap_pass():
    """An honest reply's optional metric can be inf (ε without noise) and is dropped from the
    aggregates, not a reason to reject; a count of exactly 10^12 is clamped to the partition size
    (the weight test above). Catches a metrics check so strict it rejects honest clients."""
    ok = check_reply(_answer(0, epsilon=float("inf"), **{"num-examples": MAX_COUNT}), _exp())
    assert isinstance(ok, Accepted) and ok.weight == 5.0
    check_metrics({"num-examples": 1, "cl_steps": 0, "dp_steps_total": MAX_COUNT})


def test_every_reason_maps_to_its_kind_and_counts_per_kind():
    """Catches a reason text that drifted from :func:`reason_kind`'s table (its kind would be
    counted as 'other'), and runner-prefixed reasons not being recognised."""
    exp = _exp(n=6)
    cases = [_answer(0, {"w": np.zeros((1, 4), np.float32), "b": GOOD["b"]}),
             _answer(1, {"w": GOOD["w"].astype(np.float64), "b": GOOD["b"]}),
             _answer(2, {"w": GOOD["w"]}), _answer(3, **{"server-round": 7}), _answer(9),
             _answer(4, **{"num-examples": -1})]
    outs = [check_reply(m, exp) for m in cases]
    kinds = [o.kind for o in outs]
    assert kinds == ["shape", "dtype", "names", "round", "sender", "metrics"]
    assert count_kinds(f"client {o.cid}: {o.reason}" for o in outs) == {k: 1 for k in kinds}
    assert reason_kind("client error (node 1001, clients [1, 7]): RuntimeError: boom") == "client_error"
    assert reason_kind("reply is 99999999 bytes, more than the 5 allowed") == "oversize"


def test_an_unserializable_reply_is_rejected_not_raised():
    """The server never crashes on client input: a reply whose metrics cannot even be serialized
    (a hand-made object in a record) is a rejection. Catches ``message_nbytes`` raising through."""
    msg = _answer(0)
    msg.content["metrics"].__dict__["_data"]["train_loss"] = object()
    assert _rejected(msg).kind == "decode"


@pytest.mark.parametrize("how,kind", [("shape", "shape"), ("scalar", "shape"), ("nan", "nonfinite"),
                                      ("round", "round"), ("weight", "metrics"), ("raise", "client_error"),
                                      ("dtype", "dtype")])
def test_rejections_through_the_server_loop_are_countable_by_kind(tmp_path, tiny_yaml, how, kind):
    """The reason strings that reach metrics.jsonl map to their kind (what ``rejected_by_reason``
    counts). Catches a reason text the kind table no longer recognises."""
    scn = parse_scenario(tiny_yaml)
    from fedsim.federation import get_federation
    victim = get_federation(scn).sample_clients(1)[0]
    _, rows = run_with(misbehaving_app({victim: how}), tiny_yaml.replace("rounds: 3", "rounds: 1"), tmp_path)
    assert count_kinds(rows[0]["rejected_reasons"]) == {kind: 1}, rows[0]["rejected_reasons"]
