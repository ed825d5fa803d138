"""Validation of client replies: every reply is untrusted and is accepted or rejected with a reason.

What a valid reply contains follows the round's plan (:class:`fedsim.core.server.RoundPlan`):
the model arrays the algorithms asked for (dense, or only the kept entries of a mask), each
plugin's array groups, and the required metrics. A rejected reply never stops the round; the
strategy aggregates the replies that passed.

The checks, in order (the first that fails is the reason):

1. an error reply from the client (``client_error``); a serialized reply above ``max_bytes`` (``oversize``);
2. the metrics record: ``client-id`` one of the clients sampled this round, sent from the node
   it was sent to (``sender``), not seen before this round (``duplicate``: the first reply for a
   client, or to a message, is kept and every later one rejected), ``server-round`` this round
   (``round``), required metrics finite numbers (``*_s`` >= 0), counters (``num-examples``,
   ``steps``, ``*_steps``, ...) integers in ``[0, 1e12]`` (``metrics``);
3. from the array records' metadata alone, nothing decoded yet: the record and array names
   (``names``), serialization type (``decode``), dtype (numeric and equal to the spec: ``dtype``),
   shape (equal, not merely broadcastable: ``shape``), then the records' total byte size against
   what the round's specs allow (10 % plus a small header allowance per array: ``oversize``);
4. per array, decoded by Flower's own loader (``np.load(allow_pickle=False)``; ``decode``): dtype
   and shape of the data again (the metadata may lie), then finiteness (``nonfinite``).

Every rejection has a kind; :func:`reason_kind` recovers it from the reason text alone, so
whoever holds only the strings (``metrics.jsonl``'s ``rejected_reasons``) can count them per kind.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsim.core.arrays import Named
from fedsim.core.server import ArraySpec
from fedsim.flower.codec import METRICS_RECORD, MODEL_RECORD
from fedsim.flower.compat import message_nbytes

#: The array records of a reply may exceed the bytes their specs describe by this factor ...
ARRAY_BYTES_MARGIN = 1.1
#: ... plus this much per expected array (the ``.npy`` header, 128 bytes for ordinary shapes).
ARRAY_HEADER_BYTES = 256
#: The largest value a counter metric (``num-examples``, ``steps``, ...) may report.
MAX_COUNT = 10 ** 12
#: Dtype kinds an array may have on the wire (bool, signed, unsigned, float).
NUMERIC_KINDS = "biuf"
_NUMPY_STYPE = "numpy.ndarray"
_COUNTER = re.compile(r"^(num[-_].*|steps|.*_steps(_total)?)$")


@dataclass
class Accepted:
    """A reply that passed every check, decoded (sparse arrays scattered back to dense)."""

    cid: int
    weight: float
    model: Named
    groups: dict[str, dict[str, Named]]        # plugin -> group -> arrays
    metrics: dict[str, Any]
    nbytes: int


@dataclass
class Rejected:
    """A reply that failed a check; ``cid`` is None when the reply did not say who sent it.

    ``kind`` is the check that failed (:data:`KINDS`), equal to ``reason_kind(reason)``.
    """

    cid: int | None
    reason: str
    nbytes: int = 0
    kind: str = "other"


@dataclass
class Expectation:
    """What the server expects back this round.

    ``model_spec`` None: the reply carries no arrays at all (evaluation). ``seen`` (clients) and
    ``replied_to`` (message ids) are filled as replies are checked: the first reply for a client,
    or to a message, is kept.
    """

    server_round: int
    node_of: Mapping[int, int]                   # client id -> node id it was sent to
    sizes: Mapping[int, int]                     # client id -> examples the partition gave it
    max_bytes: int
    model_spec: Mapping[str, ArraySpec] | None = None
    group_specs: Mapping[str, Mapping[str, ArraySpec]] = field(default_factory=dict)
    plugin_of: Mapping[str, tuple[str, str]] = field(default_factory=dict)   # record -> (plugin, group)
    required: tuple[str, ...] = ()               # metrics that must be finite scalars (>= 0 for *_s)
    seen: set[int] = field(default_factory=set)
    replied_to: set[str] = field(default_factory=set)

    def clients_of_node(self, node_id: int) -> list[int]:
        """The clients this round sent to ``node_id`` (who an error reply from it concerns)."""
        return sorted(c for c, n in self.node_of.items() if n == node_id)

    def expected_records(self) -> dict[str, Mapping[str, ArraySpec]]:
        """Array record name -> its specs, for every record a reply must carry."""
        out = dict(self.group_specs)
        if self.model_spec:
            out[MODEL_RECORD] = self.model_spec
        return out

    def max_array_bytes(self) -> int:
        """The most bytes the array records may hold: the specs' wire bytes plus margins."""
        specs = [s for rec in self.expected_records().values() for s in rec.values()]
        data = sum(int(np.prod(s.wire_shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in specs)
        return int(ARRAY_BYTES_MARGIN * data) + ARRAY_HEADER_BYTES * len(specs)


class ReplyError(ValueError):
    """Why a reply is rejected (one reason, in words a person can act on) and which check (``kind``)."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


def check_reply(msg: Message, exp: Expectation) -> Accepted | Rejected:
    """Validate one reply against the round's expectation (never raises on a client's input)."""
    cid, nbytes = None, 0
    try:
        nbytes = _nbytes(msg)
        if msg.has_error():
            clients = exp.clients_of_node(msg.metadata.src_node_id)
            cid = clients[0] if len(clients) == 1 else None
            who = "" if len(clients) == 1 else f" (node {msg.metadata.src_node_id}, clients {clients})"
            raise ReplyError(f"client error{who}: {msg.error.reason}", "client_error")
        if nbytes > exp.max_bytes:
            raise ReplyError(f"reply is {nbytes} bytes, more than the {exp.max_bytes} allowed", "oversize")
        metrics = _metrics(msg)
        claimed = metrics.get("client-id")
        cid = claimed if _is_int(claimed) else None
        _check_origin(msg, metrics, exp)
        check_metrics(metrics, exp.required)
        model, groups = _arrays(msg, exp)
        weight = float(min(metrics["num-examples"], exp.sizes[cid]))
    except ReplyError as exc:
        return Rejected(cid, str(exc), nbytes, exc.kind)
    return Accepted(cid, weight, model, groups, metrics, nbytes)


def _nbytes(msg: Message) -> int:
    try:
        return message_nbytes(msg)
    except Exception as exc:        # a reply Flower cannot serialize (only in-memory messages can be)
        raise ReplyError(f"reply cannot be serialized ({type(exc).__name__})", "decode") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not a list, not a string)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating)) \
        and bool(np.isfinite(value))


def is_counter(name: str) -> bool:
    """Whether metric ``name`` counts something (``num-examples``, ``steps``, ``dp_steps_total``, ...).

    Example:
        >>> [is_counter(n) for n in ("num-examples", "steps", "dp_steps_total", "train_loss", "epsilon")]
        [True, True, True, False, False]
    """
    return bool(_COUNTER.match(name))


def check_metrics(metrics: Mapping[str, Any], required: Iterable[str] = ()) -> None:
    """Raise a :class:`ReplyError` (kind ``metrics``) for absurd reply metrics.

    ``num-examples`` must be a positive integer; every ``required`` metric a finite number
    (``*_s`` timings >= 0); every counter (:func:`is_counter`) present an integer in
    ``[0, MAX_COUNT]``. Other metrics are not required: a non-finite or non-numeric one
    (an ε of inf without noise) is simply not aggregated.

    Example:
        >>> check_metrics({"num-examples": 12, "steps": 3, "train_loss": 0.5}, ("train_loss",))
        >>> check_metrics({"num-examples": 12, "steps": -3})
        Traceback (most recent call last):
        ...
        fedsim.flower.replies.ReplyError: counter 'steps' must be an integer in [0, 1e+12] (got -3)
    """
    count = metrics.get("num-examples")
    if not _is_int(count) or count <= 0 or count > MAX_COUNT:
        raise ReplyError(f"num-examples must be a positive integer of at most {MAX_COUNT:g} (got {count!r})", "metrics")
    for name in required:
        value = metrics.get(name)
        if not is_number(value):
            raise ReplyError(f"metric '{name}' must be a finite number (got {value!r})", "metrics")
        if name.endswith("_s") and value < 0:
            raise ReplyError(f"metric '{name}' must be >= 0 (got {value!r})", "metrics")
    for name, value in metrics.items():
        if is_counter(name) and not (is_number(value) and float(value).is_integer() and 0 <= value <= MAX_COUNT):
            raise ReplyError(f"counter '{name}' must be an integer in [0, {MAX_COUNT:g}] (got {value!r})", "metrics")


def _metrics(msg: Message) -> dict:
    rec = msg.content.get(METRICS_RECORD) if msg.has_content() else None
    if not isinstance(rec, MetricRecord):
        raise ReplyError("reply has no 'metrics' record", "metrics")
    return dict(rec)


def _check_origin(msg: Message, metrics: dict, exp: Expectation) -> None:
    cid = metrics.get("client-id")
    if not _is_int(cid) or cid not in exp.node_of:
        raise ReplyError(f"client-id {cid!r} was not sampled this round", "sender")
    if cid in exp.seen:
        raise ReplyError(f"duplicate reply for client {cid}", "duplicate")
    if msg.metadata.src_node_id != exp.node_of[cid]:
        raise ReplyError(f"client {cid} replied from node {msg.metadata.src_node_id}, not {exp.node_of[cid]}",
                         "sender")
    rnd = metrics.get("server-round")
    if _is_int(rnd) and rnd < exp.server_round:          # an earlier round's reply that arrived late
        raise ReplyError(f"stale reply for round {rnd}, not {exp.server_round}", "stale")
    if not _is_int(rnd) or rnd != exp.server_round:
        raise ReplyError(f"reply is for round {rnd!r}, not {exp.server_round}", "round")
    to = msg.metadata.reply_to_message_id
    if to and to in exp.replied_to:
        raise ReplyError(f"duplicate reply to message {to} (node {msg.metadata.src_node_id})", "duplicate")
    exp.seen.add(cid)                   # the first reply that says who it is keeps its place
    if to:
        exp.replied_to.add(to)


def _arrays(msg: Message, exp: Expectation) -> tuple[Named, dict[str, dict[str, Named]]]:
    """Check every array record against its specs, first from the metadata alone (names, dtype,
    shape, total bytes), then decode each array and check what its data holds."""
    records = {k: v for k, v in msg.content.items() if isinstance(v, ArrayRecord)}
    if exp.model_spec is None:
        if records:
            raise ReplyError(f"reply carries arrays {sorted(records)}, none were expected", "names")
        return {}, {}
    expected = exp.expected_records()
    extra = sorted(set(records) - set(expected))
    if extra:
        raise ReplyError(f"reply carries unexpected array records {extra}", "names")
    for record, specs in expected.items():
        if record not in records:
            raise ReplyError(f"reply has no '{record}' record", "names")
        _check_metadata(record, records[record], specs)
    size, allowed = array_record_bytes(records.values()), exp.max_array_bytes()
    if size > allowed:
        raise ReplyError(f"array records are {size} bytes, more than the {allowed} the round's arrays allow "
                         "(not decoded)", "oversize")
    model: Named = {}
    groups: dict[str, dict[str, Named]] = {}
    for record, specs in expected.items():
        decoded = _decode(records[record], specs)
        if record == MODEL_RECORD:
            model = decoded
        else:
            plugin, group = exp.plugin_of[record]
            groups.setdefault(plugin, {})[group] = decoded
    return model, groups


def array_record_bytes(records: Iterable[ArrayRecord]) -> int:
    """The serialized bytes of the arrays in ``records`` (their ``.npy`` data), without decoding any."""
    return sum(len(a.data) if isinstance(getattr(a, "data", None), (bytes, bytearray)) else 0
               for rec in records for a in rec.values())


def _check_metadata(record: str, arrays: ArrayRecord, specs: Mapping[str, ArraySpec]) -> None:
    """Names, serialization type, dtype and shape as the record declares them (nothing decoded)."""
    if set(arrays) != set(specs):
        missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
        what = "the model" if record == MODEL_RECORD else f"record '{record}'"
        raise ReplyError(f"array names differ from {what} (missing {missing}, unexpected {extra})", "names")
    for name, spec in specs.items():
        item = arrays[name]
        if getattr(item, "stype", None) != _NUMPY_STYPE:
            raise ReplyError(f"array '{name}' is serialized as {str(getattr(item, 'stype', None))[:40]!r}, "
                             f"not {_NUMPY_STYPE!r}", "decode")
        try:
            shape = tuple(int(d) for d in item.shape)
        except Exception:
            raise ReplyError(f"array '{name}' cannot be decoded (shape {str(item.shape)[:40]!r})", "decode") from None
        _check_layout(name, _dtype(name, item.dtype), shape, spec)


def _decode(arrays: ArrayRecord, specs: Mapping[str, ArraySpec]) -> Named:
    out: Named = {}
    for name, spec in specs.items():
        try:
            arr = arrays[name].numpy()                  # Flower's loader: np.load(allow_pickle=False)
        except Exception as exc:
            raise ReplyError(f"array '{name}' cannot be decoded ({type(exc).__name__})", "decode") from None
        _check_layout(name, arr.dtype, arr.shape, spec)                  # what the data holds, not what it says
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ReplyError(f"array '{name}' has NaN or infinite values", "nonfinite")
        out[name] = spec.decode(arr)
    return out


def _dtype(name: str, declared: Any) -> np.dtype:
    try:
        return np.dtype(declared)
    except Exception:
        raise ReplyError(f"array '{name}' has an unknown dtype {str(declared)[:40]!r}", "dtype") from None


def _check_layout(name: str, dtype: np.dtype, shape: tuple, spec: ArraySpec) -> None:
    """Exactly the spec's dtype and wire shape: a shape that broadcasts with it (``(1, n)`` or
    ``(n, 1)`` for ``(n,)``, a scalar) is rejected too, since arithmetic on it would silently broadcast."""
    if dtype.kind not in NUMERIC_KINDS:
        raise ReplyError(f"array '{name}' has non-numeric dtype {dtype}, expected {spec.dtype}", "dtype")
    if dtype != spec.dtype:
        raise ReplyError(f"array '{name}' has dtype {dtype}, expected {spec.dtype}", "dtype")
    if tuple(shape) != tuple(spec.wire_shape):
        note = " (broadcastable, but shapes must be equal)" if _broadcasts(tuple(shape), spec.wire_shape) else ""
        raise ReplyError(f"array '{name}' is {dtype}{list(shape)}, expected {spec.dtype}{list(spec.wire_shape)}{note}",
                         "shape")


def _broadcasts(shape: tuple, target: tuple) -> bool:
    try:
        np.broadcast_shapes(shape, target)         # numpy would combine them without a word
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------- counting rejections by kind

#: The kind of every rejection, as :func:`reason_kind` returns it.
KINDS = ("client_error", "oversize", "decode", "metrics", "sender", "duplicate", "stale", "round", "names", "dtype",
         "shape", "nonfinite", "update_norm", "other")
_RUNNER_PREFIX = re.compile(r"^client (\d+|None): ")
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple((k, re.compile(p)) for k, p in (
    ("client_error", r"^client error"),
    ("oversize", r"^(reply is \d+ bytes|array records are \d+ bytes), more than"),
    ("decode", r"^reply cannot be serialized|^array '.*' (cannot be decoded|is serialized as)"),
    ("duplicate", r"^duplicate reply"),
    ("sender", r"^client-id .* was not sampled|^client \d+ replied from node"),
    ("stale", r"^stale reply for round"),
    ("round", r"^reply is for round"),
    ("metrics", r"^reply has no 'metrics' record|^metric '|^counter '|^num-examples must be"),
    ("names", r"^reply carries arrays|^reply carries unexpected array records|^reply has no '|^array names differ"),
    ("dtype", r"^array '.*' has (non-numeric |an unknown )?dtype"),
    ("shape", r"^array '.*' is \S+\[.*\], expected"),
    ("nonfinite", r"^array '.*' has NaN or infinite values"),
    ("update_norm", r"^update norm \S+ exceeds strategy.max_update_norm"),
))


def reason_kind(reason: str) -> str:
    """The stable kind of a rejection reason (one of :data:`KINDS`), from its text alone.

    Accepts the reason as :class:`Rejected` holds it or as ``metrics.jsonl`` writes it
    (``client 3: ...``).

    Example:
        >>> reason_kind("client 3: array 'fc.weight' has NaN or infinite values")
        'nonfinite'
        >>> reason_kind("duplicate reply for client 4"), reason_kind("something new")
        ('duplicate', 'other')
    """
    text = _RUNNER_PREFIX.sub("", reason, count=1)
    return next((kind for kind, pattern in _PATTERNS if pattern.search(text)), "other")


def count_kinds(reasons: Iterable[str]) -> dict[str, int]:
    """``{kind: count}`` of rejection reasons (the ``rejected_by_reason`` of a round's row).

    Example:
        >>> count_kinds(["client 1: reply is for round 5, not 4", "client 2: stale reply for round 2, not 4"])
        {'round': 1, 'stale': 1}
    """
    return dict(Counter(reason_kind(r) for r in reasons))
