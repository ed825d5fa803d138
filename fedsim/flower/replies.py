"""Validation of client replies: every reply is untrusted and is accepted or rejected with a reason.

What a valid reply contains follows the round's plan (:class:`fedsim.core.server.RoundPlan`):
the model arrays the algorithms asked for (dense, or only the kept entries of a mask), each
plugin's array groups, and the required metrics. A rejected reply never stops the round; the
strategy aggregates the replies that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsim.core.arrays import Named
from fedsim.core.server import ArraySpec
from fedsim.flower.codec import METRICS_RECORD, MODEL_RECORD, from_record
from fedsim.flower.compat import message_nbytes


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
    """A reply that failed a check; ``cid`` is None when the reply did not say who sent it."""

    cid: int | None
    reason: str
    nbytes: int = 0


@dataclass
class Expectation:
    """What the server expects back this round.

    ``model_spec`` None: the reply carries no arrays at all (evaluation).
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

    def clients_of_node(self, node_id: int) -> list[int]:
        """The clients this round sent to ``node_id`` (who an error reply from it concerns)."""
        return sorted(c for c, n in self.node_of.items() if n == node_id)


class ReplyError(ValueError):
    """Why a reply is rejected (one reason, in words a person can act on)."""


def check_reply(msg: Message, exp: Expectation) -> Accepted | Rejected:
    """Validate one reply against the round's expectation."""
    cid = None
    nbytes = message_nbytes(msg)
    try:
        if msg.has_error():
            clients = exp.clients_of_node(msg.metadata.src_node_id)
            cid = clients[0] if len(clients) == 1 else None
            who = "" if len(clients) == 1 else f" (node {msg.metadata.src_node_id}, clients {clients})"
            raise ReplyError(f"client error{who}: {msg.error.reason}")
        if nbytes > exp.max_bytes:
            raise ReplyError(f"reply is {nbytes} bytes, more than the {exp.max_bytes} allowed")
        metrics = _metrics(msg)
        claimed = metrics.get("client-id")
        cid = claimed if isinstance(claimed, int) else None
        _check_origin(msg, metrics, exp)
        _check_scalars(metrics, exp.required)
        model, groups = _arrays(msg, exp)
        reported = metrics.get("num-examples")
        if not isinstance(reported, int) or reported <= 0:
            raise ReplyError(f"num-examples must be a positive integer (got {reported!r})")
        weight = float(min(reported, exp.sizes[cid]))
    except ReplyError as exc:
        return Rejected(cid, str(exc), nbytes)
    exp.seen.add(cid)
    return Accepted(cid, weight, model, groups, metrics, nbytes)


def _check_scalars(metrics: dict, names: tuple[str, ...]) -> None:
    for name in names:
        value = metrics.get(name)
        if not is_number(value):
            raise ReplyError(f"metric '{name}' must be a finite number (got {value!r})")
        if name.endswith("_s") and value < 0:
            raise ReplyError(f"metric '{name}' must be >= 0 (got {value!r})")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not a list)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and bool(np.isfinite(value))


def _metrics(msg: Message) -> dict:
    rec = msg.content.get(METRICS_RECORD) if msg.has_content() else None
    if not isinstance(rec, MetricRecord):
        raise ReplyError("reply has no 'metrics' record")
    return dict(rec)


def _check_origin(msg: Message, metrics: dict, exp: Expectation) -> None:
    cid = metrics.get("client-id")
    if not isinstance(cid, int) or cid not in exp.node_of:
        raise ReplyError(f"client-id {cid!r} was not sampled this round")
    if cid in exp.seen:
        raise ReplyError(f"duplicate reply for client {cid}")
    if msg.metadata.src_node_id != exp.node_of[cid]:
        raise ReplyError(f"client {cid} replied from node {msg.metadata.src_node_id}, not {exp.node_of[cid]}")
    if metrics.get("server-round") != exp.server_round:
        raise ReplyError(f"reply is for round {metrics.get('server-round')!r}, not {exp.server_round}")


def _arrays(msg: Message, exp: Expectation) -> tuple[Named, dict[str, dict[str, Named]]]:
    records = {k: v for k, v in msg.content.items() if isinstance(v, ArrayRecord)}
    if exp.model_spec is None:
        if records:
            raise ReplyError(f"reply carries arrays {sorted(records)}, none were expected")
        return {}, {}
    expected = dict(exp.group_specs)
    if exp.model_spec:
        expected[MODEL_RECORD] = exp.model_spec
    extra = sorted(set(records) - set(expected))
    if extra:
        raise ReplyError(f"reply carries unexpected array records {extra}")
    model: Named = {}
    groups: dict[str, dict[str, Named]] = {}
    for record, specs in expected.items():
        if record not in records:
            raise ReplyError(f"reply has no '{record}' record")
        decoded = _decode(record, from_record(records[record]), specs)
        if record == MODEL_RECORD:
            model = decoded
        else:
            plugin, group = exp.plugin_of[record]
            groups.setdefault(plugin, {})[group] = decoded
    return model, groups


def _decode(record: str, got: Named, specs: Mapping[str, ArraySpec]) -> Named:
    if set(got) != set(specs):
        missing, extra = sorted(set(specs) - set(got)), sorted(set(got) - set(specs))
        what = "the model" if record == MODEL_RECORD else f"record '{record}'"
        raise ReplyError(f"array names differ from {what} (missing {missing}, unexpected {extra})")
    out: Named = {}
    for name, spec in specs.items():
        arr = got[name]
        if arr.shape != spec.wire_shape or arr.dtype != spec.dtype:
            raise ReplyError(f"array '{name}' is {arr.dtype}{list(arr.shape)}, "
                             f"expected {spec.dtype}{list(spec.wire_shape)}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ReplyError(f"array '{name}' has NaN or infinite values")
        out[name] = spec.decode(arr)
    return out
