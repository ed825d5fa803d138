"""fedsim's Flower strategy: sampling, per-round config, reply validation, pure aggregation.

The strategy is a Flower Message-API ``Strategy``. It samples virtual clients as a pure
function of (seed, round), sends each one the global arrays plus per-round scalars
(``server-round``, ``client-id``, ``lr``), rejects bad replies one by one, and calls
fedsim's pure aggregation and server optimizer. Replies are aggregated in client-id
order, so the result never depends on arrival order.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.algorithms import fedhyper
from fedsim.algorithms.aggregate import ServerOptimizer, mean_update
from fedsim.errors import RunError
from fedsim.federation import Federation
from fedsim.flower.codec import config_record, from_record, message_nbytes, to_record
from fedsim.flower.replies import Accepted, Expectation, Rejected, check_reply

#: A reply may be at most this many times the size of the global model (plus 1 MiB of slack).
REPLY_SIZE_FACTOR = 4
#: Metrics a reply must carry as finite numbers, per stage.
TRAIN_METRICS = ("train_loss", "compute_s", "lr_local")
EVALUATE_METRICS = ("eval_loss", "eval_accuracy")


class FedsimStrategy(Strategy):
    """The strategy behind every fedsim scenario (FedAvg, FedAvgM, FedAdam, FedProx)."""

    def __init__(self, federation: Federation, optimizer: ServerOptimizer | None = None):
        self.fed = federation
        self.proximal_mu = float(getattr(federation.scenario.strategy, "proximal_mu", 0.0))
        self.optimizer = optimizer or federation.server_optimizer()
        sched = federation.scenario.lr_schedule
        self.uniform = sched is not None and sched.kind != "constant" and sched.weighting == "uniform"
        self.send_prev_update = sched is not None and sched.uses_cl
        self.trainable = federation.trainable_mask()
        self.opt_state: dict = {}
        self.round_log: dict = {}
        self._global: dict[str, np.ndarray] = {}
        self._exp: Expectation | None = None

    # ----------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One TRAIN message per sampled client, each naming its virtual client id."""
        self._global = from_record(arrays)
        if not self.opt_state:
            self.opt_state = self.optimizer.init(list(self._global.values()))
        cids = self.fed.sample_clients(server_round)
        node_of = self._assign_nodes(cids, grid)
        specs = {k: (v.shape, v.dtype) for k, v in self._global.items()}
        model_bytes = sum(v.nbytes for v in self._global.values())
        self._exp = Expectation(server_round, node_of, specs, dict(enumerate(self.fed.client_sizes)),
                                REPLY_SIZE_FACTOR * model_bytes + (1 << 20), TRAIN_METRICS)
        extra = self._round_extras()
        msgs = [self._message(MessageType.TRAIN, arrays, config, server_round, cid, node_of[cid], extra)
                for cid in cids]
        self.round_log = {"sampled": cids, "bytes_down": sum(message_nbytes(m) for m in msgs)}
        return msgs

    def local_lr(self) -> float:
        """The client LR for this round: the scenario's, times the schedule's factor (SL, Decay-SL)."""
        scale = getattr(self.optimizer, "local_lr_scale", None)
        base = self.fed.scenario.federation.local.lr
        return base * float(scale(self.opt_state)) if scale is not None else base

    def global_lr(self) -> float:
        """The server LR of the last step (FedHyper G/GM, decay, FedExp), else the strategy's."""
        lr = getattr(self.optimizer, "global_lr", None)
        return float(lr(self.opt_state)) if lr is not None else float(getattr(self.fed.scenario.strategy,
                                                                               "server_lr", 1.0))

    def _round_extras(self) -> dict:
        """Per-round scalars (and FedHyper CL's previous global update) for every client."""
        extra: dict = {"lr": self.local_lr()}
        if self.send_prev_update:
            extra["fedhyper-cl"] = True
            prev = fedhyper.previous_update(self.opt_state)
            if prev is not None:
                names = [k for k, t in zip(self._global, self.trainable) if t]
                extra["prev_update"] = to_record({k: v.astype(np.float32) for k, v in zip(names, prev)})
        return extra

    def _message(self, mtype: str, arrays: ArrayRecord, config: ConfigRecord, server_round: int, cid: int,
                 node: int, extra: dict) -> Message:
        extra = dict(extra)
        prev = extra.pop("prev_update", None)
        cfg = config_record({**dict(config), "server-round": server_round, "client-id": cid,
                             "proximal-mu": self.proximal_mu, **extra})
        content = RecordDict({"arrays": arrays, "config": cfg})
        if prev is not None:
            content["prev_update"] = prev
        return Message(content, dst_node_id=node, message_type=mtype)

    @staticmethod
    def _assign_nodes(cids: list[int], grid: Grid) -> dict[int, int]:
        """Virtual client -> node: node k serves clients k, k + N, k + 2N, ... (N nodes, sorted ids)."""
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise RunError("no client nodes are connected to the grid")
        return {cid: nodes[cid % len(nodes)] for cid in cids}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, aggregate the accepted ones in client-id order, step the server optimizer."""
        assert self._exp is not None and self._exp.server_round == server_round, "configure_train first"
        results = [check_reply(m, self._exp) for m in replies]
        ok = sorted((r for r in results if isinstance(r, Accepted)), key=lambda r: r.cid)
        bad = [r for r in results if isinstance(r, Rejected)]
        self.round_log.update(rejected=[(r.cid, r.reason) for r in bad], bytes_up=sum(r.nbytes for r in results))
        metrics = self._train_metrics(ok, bad)
        if not ok:
            metrics["lr_global"] = self.global_lr()
            return None, MetricRecord(metrics)
        start = time.perf_counter()
        params = list(self._global.values())
        delta = mean_update(params, [r.arrays for r in ok], [1.0 if self.uniform else r.weight for r in ok])
        if self.optimizer.name == "fedexp":
            new, self.opt_state = self.optimizer.update(params, delta, self.opt_state,
                                                        client_params=[r.arrays for r in ok])
        else:
            new, self.opt_state = self.optimizer.update(params, delta, self.opt_state)
        self.round_log["aggregate_s"] = time.perf_counter() - start
        metrics["lr_global"] = self.global_lr()
        return to_record(dict(zip(self._global, new))), MetricRecord(metrics)

    @staticmethod
    def _train_metrics(ok: list[Accepted], bad: list[Rejected]) -> dict:
        weights = np.array([r.weight for r in ok], dtype=np.float64)
        losses = np.array([float(r.metrics["train_loss"]) for r in ok], dtype=np.float64)
        loss = float((weights * losses).sum() / weights.sum()) if ok else float("nan")
        lrs = [float(r.metrics["lr_local"]) for r in ok]
        out = {"clients": len(ok), "rejected": len(bad), "train_loss": loss,
               "client_compute_s": float(sum(float(r.metrics["compute_s"]) for r in ok))}
        if lrs:
            out.update(lr_local_mean=float(np.mean(lrs)), lr_local_min=min(lrs), lr_local_max=max(lrs))
        return out

    # -------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Client-side evaluation every ``federation.client_eval_every`` rounds (0 = never)."""
        every = self.fed.scenario.federation.client_eval_every
        if not every or server_round % every:
            self._exp = None
            return []
        cids = self.fed.sample_clients(server_round)
        node_of = self._assign_nodes(cids, grid)
        self._exp = Expectation(server_round, node_of, {}, dict(enumerate(self.fed.client_sizes)), 1 << 20,
                                EVALUATE_METRICS)
        return [self._message(MessageType.EVALUATE, arrays, config, server_round, c, node_of[c], {}) for c in cids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local loss and accuracy."""
        if self._exp is None:
            return None
        ok = [r for r in (check_reply(m, self._exp, with_arrays=False) for m in replies) if isinstance(r, Accepted)]
        if not ok:
            return None
        w = np.array([r.weight for r in ok], dtype=np.float64)
        mean = {k: float((w * [r.metrics[k] for r in ok]).sum() / w.sum()) for k in ("eval_loss", "eval_accuracy")}
        return MetricRecord({"client_eval_loss": mean["eval_loss"], "client_eval_accuracy": mean["eval_accuracy"],
                             "client_eval_clients": len(ok)})

    def summary(self) -> None:
        """Flower's hook to log the strategy settings (fedsim writes them to config.yaml instead)."""
