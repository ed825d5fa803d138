"""fedsim's Flower strategy: a thin adapter between Flower messages and :class:`fedsim.core.server.Server`.

Per round it samples virtual clients (a pure function of seed and round), turns the server's
:class:`~fedsim.core.server.RoundPlan` into one TRAIN message per client (the global arrays,
the plan's scalars and plugin arrays, ``server-round`` and ``client-id``), validates every
reply against the plan and rejects bad ones one by one, and hands the accepted replies — in
client-id order, so arrival order never matters — to the server's pure aggregation. It knows
no algorithm: everything algorithm-specific is in the server's optimizer and plugins.

The ServerApp loop (:mod:`fedsim.flower.runner`) calls :meth:`FedsimStrategy.aggregate`, which
returns the whole round outcome (rejections with reasons, per-client rows); Flower's
``aggregate_train`` is a wrapper around it. The server state is :meth:`state_dict` /
:meth:`load_state_dict` (a plain tree, see :mod:`fedsim.core.state`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.core.arrays import Named
from fedsim.core.server import ClientUpdate, RoundPlan, Server
from fedsim.errors import RunError
from fedsim.federation import Federation
from fedsim.flower.codec import CONFIG_RECORD, MODEL_RECORD, config_record, from_record, to_record
from fedsim.flower.compat import ErrorCode
from fedsim.flower.replies import Accepted, Expectation, Rejected, check_reply, is_number

#: A reply may be at most this many times the size of the global model (plus 1 MiB of slack).
REPLY_SIZE_FACTOR = 4
#: Error codes of a reply the runtime made because the client's own never came (worker or node
#: died, message expired): such a client may be sent the round again (``federation.retries``).
LOST_CODES = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                        ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED})
#: Metrics a training reply must carry as finite numbers.
TRAIN_METRICS = ("train_loss", "compute_s", "lr_local")
EVALUATE_METRICS = ("eval_loss", "eval_accuracy")
#: Reply metrics that are part of the protocol (every other numeric metric is reported as
#: ``<name>_mean/_min/_max`` in the round's row and as is in ``clients.jsonl``).
PROTOCOL_METRICS = ("client-id", "server-round", "num-examples", "train_loss", "compute_s")


@dataclass
class RoundOutcome:
    """One round's result: new global arrays (None: unchanged), metrics, rejections, client rows."""

    arrays: Named | None
    metrics: dict[str, Any]
    rejected: list[tuple[int | None, str, str]] = field(default_factory=list)   # (client id, reason, kind)
    clients: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    aggregate_s: float = 0.0
    sparse_saved_up: int = 0        # array bytes the accepted replies' sparse model arrays did not carry


class FedsimStrategy(Strategy):
    """The strategy behind every fedsim scenario: sampling, messages, reply checks, the pure server."""

    def __init__(self, federation: Federation, server: Server):
        self.fed, self.server = federation, server
        self.state: dict | None = None
        self._plan: RoundPlan | None = None
        self._exp: Expectation | None = None
        self._params: Named = {}
        self._outbox: dict[int, tuple[dict, dict]] = {}   # this round's TRAIN records and scalars per client
        self.sparse_saved_down = 0      # array bytes per TRAIN message the sparse model downlink did not carry

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The server state (optimizer and plugins), a tree of numbers and arrays."""
        return {"server": self.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` output (resume)."""
        self.state = state["server"]

    def files(self) -> dict:
        """The algorithms' documents for the run directory (``privacy.json`` ...)."""
        return self.server.files(self.state) if self.state is not None else {}

    def run_summary(self, rows: list[dict]) -> dict:
        """The algorithms' keys for ``summary.json`` (``summary`` is Flower's logging hook)."""
        return self.server.summary(self.state, rows) if self.state is not None else {}

    def first_round(self, params: Named) -> int:
        """The first round to run: 0 when an algorithm has a stage before round 1, else 1."""
        if self.state is None:
            self.state = self.server.init(params)
        return self.server.first_round(self.state)

    # ----------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """One TRAIN message per sampled client, each naming its virtual client id."""
        self._params = from_record(arrays)
        if self.state is None:
            self.state = self.server.init(self._params)
        plan = self._plan = self.server.plan(self.state, server_round, self._params)
        cids = sorted(plan.cohort) if plan.cohort is not None else self.fed.sample_clients(server_round)
        node_of = self._assign_nodes(cids, grid)
        model_bytes = sum(v.nbytes for v in self._params.values())
        self._exp = Expectation(server_round, node_of, dict(enumerate(self.fed.client_sizes)),
                                REPLY_SIZE_FACTOR * model_bytes + (1 << 20), plan.model_spec, plan.group_specs,
                                plan.plugin_of, TRAIN_METRICS)
        shared = {name: to_record(group) for name, group in plan.arrays.items()}
        model = arrays
        self.sparse_saved_down = 0
        if plan.down_spec:
            encoded = plan.encode_model(self._params)
            model = to_record(encoded)
            self.sparse_saved_down = model_bytes - sum(v.nbytes for v in encoded.values())
        self._outbox = {}
        for cid in cids:
            own = self.server.client_downlink(self.state, plan, cid)
            self._outbox[cid] = ({MODEL_RECORD: model, **shared, **{k: to_record(v) for k, v in own.arrays.items()}},
                                 {**dict(config), **plan.scalars, **own.scalars})
        return [self._train_message(cid, node_of[cid]) for cid in cids]

    def _train_message(self, cid: int, node: int) -> Message:
        records, scalars = self._outbox[cid]
        return self._message(MessageType.TRAIN, records, scalars, self._plan.server_round, cid, node)  # type: ignore[union-attr]

    @staticmethod
    def lost(msgs: Iterable[Message], replies: Iterable[Message]) -> dict[int, str]:
        """Client id -> why, for every message of ``msgs`` (sent: they have ids) whose reply did not
        come or is the runtime's report that it was lost (the worker or node died or was unreachable).
        A client that answered, even with a reply that fails the checks, is not lost: sending it
        the same round again would give the same answer."""
        got = {r.metadata.reply_to_message_id: r for r in replies}
        out = {}
        for m in msgs:
            cid = client_of(m)
            reply = got.get(m.metadata.message_id)
            if reply is None:
                out[cid] = "no reply within the round's time"
            elif reply.has_error() and reply.error.code in LOST_CODES:
                out[cid] = reply.error.reason.splitlines()[0] if reply.error.reason else f"error {reply.error.code}"
        return out

    def resend(self, cids: Iterable[int], grid: Grid) -> list[Message]:
        """This round's TRAIN messages again for ``cids``, to the nodes now connected (a node that
        left is no longer chosen); replies are then expected from those nodes."""
        assert self._exp is not None, "configure_train first"
        cids = sorted(cids)
        node_of = self._assign_nodes(cids, grid)
        self._exp.node_of = {**self._exp.node_of, **node_of}
        return [self._train_message(cid, node_of[cid]) for cid in cids]

    @staticmethod
    def _message(mtype: str, records: dict, scalars: dict, server_round: int, cid: int, node: int) -> Message:
        cfg = config_record({**scalars, "server-round": server_round, "client-id": cid})
        return Message(RecordDict({**records, CONFIG_RECORD: cfg}), dst_node_id=node, message_type=mtype)

    @staticmethod
    def _assign_nodes(cids: list[int], grid: Grid) -> dict[int, int]:
        """Virtual client -> node: node k serves clients k, k + N, k + 2N, ... (N nodes, sorted ids)."""
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise RunError("no client nodes are connected to the grid")
        return {cid: nodes[cid % len(nodes)] for cid in cids}

    def aggregate(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Validate every reply, aggregate the accepted ones in client-id order, step the server."""
        assert self._exp is not None and self._plan is not None and self.state is not None \
            and self._exp.server_round == server_round, "configure_train first"
        results = [check_reply(m, self._exp) for m in replies]
        ok = sorted((r for r in results if isinstance(r, Accepted)), key=lambda r: r.cid)
        bad = [r for r in results if isinstance(r, Rejected)]
        start = time.perf_counter()
        updates = [ClientUpdate(r.cid, r.weight, r.model, r.groups, _numbers(r.metrics)) for r in ok]
        self.state, updates, refused = self.server.screen(self.state, self._plan, self._params, updates)
        if refused:                         # a plugin's screen (the norm guard): rejections like the checks'
            nbytes = {r.cid: r.nbytes for r in ok}
            bad += [Rejected(u.cid, reason, nbytes[u.cid], kind) for u, reason, kind in refused]
            kept = {u.cid for u in updates}
            ok = [r for r in ok if r.cid in kept]
        refused_updates = [u for u, _, _ in refused]
        needed = self.fed.scenario.federation.replies_needed(len(self._exp.node_of))
        skipped = len(ok) < needed          # always with no accepted reply: at least 1 is needed
        if skipped:
            self.state, server_metrics = self.server.skip(self.state, self._plan, self._params, updates,
                                                          refused_updates)
            server_metrics = {**server_metrics, "skipped": True,
                              "skip_reason": f"{len(ok)} of {len(self._exp.node_of)} replies accepted, fewer than "
                                             f"federation.min_replies ({needed}): the round is not aggregated"}
        else:
            new, self.state, server_metrics = self.server.aggregate(self.state, self._plan, self._params, updates,
                                                                    refused_updates)
        spec = self._plan.model_spec
        saved = sum(int(np.prod(spec[k].shape) - np.prod(spec[k].wire_shape)) * spec[k].dtype.itemsize
                    for k in spec if spec[k].kept is not None)
        return RoundOutcome(None if skipped else new, {**_train_metrics(ok, bad, server_metrics), **server_metrics},
                            [(r.cid, r.reason, r.kind) for r in bad], [_client_row(server_round, r) for r in ok],
                            sum(r.nbytes for r in results), time.perf_counter() - start, saved * len(ok))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's API: :meth:`aggregate`, as records."""
        out = self.aggregate(server_round, replies)
        return (to_record(out.arrays) if out.arrays is not None else None,
                MetricRecord({k: v for k, v in out.metrics.items() if is_number(v)}))

    # -------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        """Client-side evaluation every ``federation.client_eval_every`` rounds (0 = never)."""
        every = self.fed.scenario.federation.client_eval_every
        if not every or server_round % every:
            self._exp = None
            return []
        cids = self.fed.sample_clients(server_round)
        node_of = self._assign_nodes(cids, grid)
        self._exp = Expectation(server_round, node_of, dict(enumerate(self.fed.client_sizes)), 1 << 20,
                                required=EVALUATE_METRICS)
        return [self._message(MessageType.EVALUATE, {MODEL_RECORD: arrays}, dict(config), server_round, c, node_of[c])
                for c in cids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local loss and accuracy."""
        if self._exp is None:
            return None
        ok = [r for r in (check_reply(m, self._exp) for m in replies) if isinstance(r, Accepted)]
        if not ok:
            return None
        w = np.array([r.weight for r in ok], dtype=np.float64)
        mean = {k: float((w * [r.metrics[k] for r in ok]).sum() / w.sum()) for k in ("eval_loss", "eval_accuracy")}
        return MetricRecord({"client_eval_loss": mean["eval_loss"], "client_eval_accuracy": mean["eval_accuracy"],
                             "client_eval_clients": len(ok)})

    def summary(self) -> None:
        """Flower's hook to log the strategy settings (fedsim writes them to config.yaml instead)."""


def client_of(msg: Message) -> int:
    """The virtual client a message fedsim sent is for."""
    return int(msg.content[CONFIG_RECORD]["client-id"])


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if is_number(v)}


def _train_metrics(ok: list[Accepted], bad: list[Rejected], server: dict[str, Any]) -> dict[str, Any]:
    """The round's client-side numbers: example-weighted train loss, compute time, and every other
    finite numeric metric the clients reported, as ``_mean``, ``_min`` and ``_max`` — unless the
    server reports ``<name>_max`` or ``<name>_mean`` itself (it aggregates that metric over every
    client, not only this round's: a privacy mirror's ε)."""
    weights = np.array([r.weight for r in ok], dtype=np.float64)
    losses = np.array([float(r.metrics["train_loss"]) for r in ok], dtype=np.float64)
    out: dict[str, Any] = {"clients": len(ok), "rejected": len(bad),
                           "train_loss": float((weights * losses).sum() / weights.sum()) if ok else float("nan"),
                           "client_compute_s": float(sum(float(r.metrics["compute_s"]) for r in ok))}
    names = dict.fromkeys(k for r in ok for k, v in r.metrics.items() if k not in PROTOCOL_METRICS and is_number(v)
                          and f"{k}_max" not in server and f"{k}_mean" not in server)
    for name in names:
        values = [r.metrics[name] for r in ok if is_number(r.metrics.get(name))]
        out.update({f"{name}_mean": float(np.mean(values)), f"{name}_min": min(values), f"{name}_max": max(values)})
    return out


def _client_row(server_round: int, r: Accepted) -> dict[str, Any]:
    """One line of ``clients.jsonl``."""
    extra = {k: v for k, v in r.metrics.items() if k not in PROTOCOL_METRICS and is_number(v)}
    return {"round": server_round, "client_id": r.cid, "num_examples": r.metrics["num-examples"],
            "train_loss": r.metrics["train_loss"], "compute_s": r.metrics["compute_s"], **extra}
