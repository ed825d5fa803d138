"""Validation of client replies: every reply is untrusted and is accepted or rejected with a reason.

A rejected reply never stops the round; the strategy aggregates the replies that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsim.flower.codec import from_record, message_nbytes


@dataclass
class Accepted:
    """A reply that passed every check."""

    cid: int
    arrays: list[np.ndarray]
    weight: float
    metrics: dict[str, float]
    nbytes: int


@dataclass
class Rejected:
    """A reply that failed a check; ``cid`` is None when the reply did not say who sent it."""

    cid: int | None
    reason: str
    nbytes: int = 0


@dataclass
class Expectation:
    """What the server expects back this round."""

    server_round: int
    node_of: Mapping[int, int]                   # client id -> node id it was sent to
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]   # array name -> (shape, dtype)
    sizes: Mapping[int, int]                     # client id -> examples the partition gave it
    max_bytes: int
    required: tuple[str, ...] = ()               # metrics that must be finite scalars (>= 0 for *_s)
    seen: set[int] = field(default_factory=set)

    def clients_of_node(self, node_id: int) -> list[int]:
        """The clients this round sent to ``node_id`` (who an error reply from it concerns)."""
        return sorted(c for c, n in self.node_of.items() if n == node_id)


class ReplyError(ValueError):
    """Why a reply is rejected (one reason, in words a person can act on)."""


def check_reply(msg: Message, exp: Expectation, *, with_arrays: bool = True) -> Accepted | Rejected:
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
        arrays = _arrays(msg, exp) if with_arrays else []
        reported = metrics.get("num-examples")
        if not isinstance(reported, int) or reported <= 0:
            raise ReplyError(f"num-examples must be a positive integer (got {reported!r})")
        weight = float(min(reported, exp.sizes[cid]))
    except ReplyError as exc:
        return Rejected(cid, str(exc), nbytes)
    exp.seen.add(cid)
    return Accepted(cid, arrays, weight, metrics, nbytes)


def _check_scalars(metrics: dict, names: tuple[str, ...]) -> None:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ReplyError(f"metric '{name}' must be a finite number (got {value!r})")
        if name.endswith("_s") and value < 0:
            raise ReplyError(f"metric '{name}' must be >= 0 (got {value!r})")


def _metrics(msg: Message) -> dict:
    rec = msg.content.get("metrics") if msg.has_content() else None
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


def _arrays(msg: Message, exp: Expectation) -> list[np.ndarray]:
    rec = msg.content.get("arrays")
    if not isinstance(rec, ArrayRecord):
        raise ReplyError("reply has no 'arrays' record")
    got = from_record(rec)
    if set(got) != set(exp.specs):
        missing, extra = sorted(set(exp.specs) - set(got)), sorted(set(got) - set(exp.specs))
        raise ReplyError(f"array names differ from the model (missing {missing}, unexpected {extra})")
    out = []
    for name, (shape, dtype) in exp.specs.items():
        arr = got[name]
        if arr.shape != shape or arr.dtype != dtype:
            raise ReplyError(f"array '{name}' is {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ReplyError(f"array '{name}' has NaN or infinite values")
        out.append(arr)
    return out
