"""The server loop behind ``server/app.py``: rounds, evaluation, metrics, checkpoints, resume, summary.

Flower's ``Strategy.start`` has no progress, no per-round files and no checkpoints, so the
ServerApp drives fedsim's strategy itself. It runs unchanged on any Grid: the in-process one,
the worker pool, or a SuperLink.

Checkpoints (``output.checkpoint_every``) hold the global arrays and the whole server state
(optimizer and plugins) as safetensors + JSON, and a snapshot of the client state, so a resumed
run continues exactly — stateful clients included (on the engines that keep client state in
the run directory: ``inprocess`` and ``workers``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid

import fedsim
from fedsim.builder import build
from fedsim.core.state import flatten, unflatten
from fedsim.errors import ResumeError, RunError
from fedsim.federation import Federation, get_federation
from fedsim.flower.codec import (FORCE_KEY, MIN_NODES_KEY, NODE_WAIT_KEY, OUT_DIR_KEY, PROGRESS_KEY,
                                 RESUME_KEY, SHIP_KEY, scenario_from_config, to_record)
from fedsim.flower.compat import message_nbytes
from fedsim.flower.strategy import FedsimStrategy, RoundOutcome, client_of
from fedsim.progress import RoundProgress
from fedsim.results import MetricsWriter, build_summary, bundle, plot_run, read_metrics, save_checkpoint, write_json
from fedsim.flower.state_store import restore_snapshot
from fedsim.results.checkpoint import (checkpoint_path, iter_intact, prune_checkpoints, snapshot_client_state,
                                       snapshot_path)
from fedsim.results.metrics import CLIENTS_NAME
from fedsim.runtime import atomic_write_text, default_device
from fedsim.scenario import Scenario, config_diff, config_sha256, result_config, to_yaml
from fedsim.train import evaluate


def serve(grid: Grid, context: Context) -> dict:
    """Run the whole federation described by the run config on ``grid``; returns the summary."""
    cfg = context.run_config
    scn = scenario_from_config(cfg)
    ship = str(cfg.get(SHIP_KEY, "")).lower() == "true"
    out_dir = Path(str(cfg.get(OUT_DIR_KEY) or "") or tempfile.mkdtemp(prefix=f"fedsim-{scn.name}-"))
    wait_for_nodes(grid, int(cfg.get(MIN_NODES_KEY, 1)), float(cfg.get(NODE_WAIT_KEY, 120.0)))
    resume = str(cfg.get(RESUME_KEY, "")).lower() == "true"
    force = str(cfg.get(FORCE_KEY, "")).lower() == "true"
    summary = ServerLoop(scn, out_dir, str(cfg.get(PROGRESS_KEY, "auto")), resume, force).run(grid)
    if ship:      # a remote submitter reads the results back from this log
        print(bundle.pack(out_dir), flush=True)
    return summary


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> None:
    """Block until ``count`` client nodes are connected (bounded: a clear error after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= count:
            return
        if time.monotonic() > deadline:
            raise RunError(f"only {have} of {count} client nodes connected within {timeout_s:.0f} s; "
                           "check that the SuperNodes are running and can reach the SuperLink")
        time.sleep(0.5)


class ServerLoop:
    """One run: owns the run directory while it trains."""

    def __init__(self, scenario: Scenario, out_dir: Path, progress: str = "auto", resume: bool = False,
                 force: bool = False):
        self.scn, self.out, self.resume, self.force = scenario, out_dir, resume, force
        self.fed: Federation = get_federation(scenario)
        algorithms = build(scenario, self.fed)
        self.strategy = FedsimStrategy(self.fed, algorithms.server)
        self.client_plugins = algorithms.client_plugins
        self.progress_mode = progress
        self.eval_model = self.fed.build_model()
        self.stats = self.fed.stats()
        self.totals = {"aggregate_s": 0.0, "wall_s": 0.0}    # carried over from a checkpoint on resume
        self.notes: list[str] = [*self.fed.notes, *algorithms.notes]

    def run(self, grid: Grid) -> dict:
        """Train for ``federation.rounds`` rounds and write every result file."""
        if self.resume:
            done, arrays, rows = self._restore()
            first = done + 1
        else:
            arrays, rows = self.fed.initial_arrays(), []
            first = self.strategy.first_round(arrays)
        self._prepare()
        start = time.perf_counter() - self.totals["wall_s"]
        with MetricsWriter(self.out, append=self.resume) as sink, \
                MetricsWriter(self.out, append=self.resume, name=CLIENTS_NAME, csv_name=None) as clients, \
                RoundProgress(self.scn.federation.rounds, self.progress_mode) as bar:
            for note in self.notes:
                bar.warn(note)
            bar.note(self._partition_line() + (f"; resuming after round {first - 1}" if self.resume else ""))
            for rnd in range(first, self.scn.federation.rounds + 1):
                arrays, row, outcome = self._round(grid, rnd, arrays, start)
                sink.write(row)
                for client_row in outcome.clients:
                    clients.write(client_row)
                rows.append(row)
                for name, doc in self.strategy.files().items():
                    write_json(self.out / name, doc)
                bar.update(rnd, row)
                for event in row.get("events", []):
                    bar.warn(f"round {rnd}: {event}")
                if row.get("skipped"):
                    self._too_few(bar, rnd, row)
                self._maybe_checkpoint(rnd, arrays, time.perf_counter() - start)
        summary = self._finish(rows, arrays, time.perf_counter() - start)
        if rows and not any(r["clients"] for r in rows):
            raise RunError(f"no client reply was accepted in any round; the reasons are in {self.out}/metrics.jsonl "
                           "(rejected_reasons)")
        return summary

    # ------------------------------------------------------------------ rounds
    def _round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray],
               start: float) -> tuple[dict, dict, RoundOutcome]:
        t0 = time.perf_counter()
        st = self.strategy
        msgs = st.configure_train(rnd, to_record(arrays), ConfigRecord(), grid)
        bytes_down = sum(message_nbytes(m) for m in msgs)
        replies, resent, retry_events = self._train_replies(grid, msgs)
        bytes_down += sum(message_nbytes(m) for m in resent)
        outcome = st.aggregate(rnd, replies)
        if outcome.arrays is not None:
            arrays = outcome.arrays
        self.totals["aggregate_s"] += outcome.aggregate_s
        row: dict[str, Any] = {"round": rnd, **outcome.metrics, "bytes_down": bytes_down, "bytes_up": outcome.bytes_up}
        if st.sparse_saved_down or outcome.sparse_saved_up:      # what the same messages would weigh dense
            row.update(bytes_down_dense=bytes_down + st.sparse_saved_down * len(msgs),
                       bytes_up_dense=outcome.bytes_up + outcome.sparse_saved_up)
        row.update(self._client_eval(grid, rnd, arrays))
        row.update(self._server_eval(rnd, arrays))
        if outcome.rejected:
            row["rejected_reasons"] = [f"client {c}: {r}" for c, r, _ in outcome.rejected]
            row["rejected_by_reason"] = dict(Counter(kind for _, _, kind in outcome.rejected))
        events = grid.take_events() if hasattr(grid, "take_events") else []   # fedsim's own grids report restarts
        events += retry_events
        if events:
            row["events"] = events
        row.update(round_s=time.perf_counter() - t0, wall_s=time.perf_counter() - start)
        return arrays, row, outcome

    def _too_few(self, bar: RoundProgress, rnd: int, row: dict) -> None:
        """Say that round ``rnd`` was not aggregated, and stop the run if the scenario says so."""
        why = "; ".join(row.get("rejected_reasons", []))
        bar.note(f"[yellow]round {rnd}: {row['skip_reason']}[/yellow]" + (f" ({why[:300]})" if why else ""))
        if self.scn.federation.on_too_few_replies == "stop":
            raise RunError(f"round {rnd}: {row['skip_reason']}, and federation.on_too_few_replies is 'stop'. "
                           f"Why each reply was lost or rejected is in {self.out}/metrics.jsonl (rejected_reasons, "
                           "events)")

    def _train_replies(self, grid: Grid, msgs: list[Message]) -> tuple[list[Message], list[Message], list[str]]:
        """The round's training replies, sending the round again to the clients whose reply was lost
        (``federation.retries`` times at most, all within ``round_timeout_s``). Returns the replies
        (for a client sent the round again, only its last answer), the messages sent again, and
        one line per retry."""
        fed, st = self.scn.federation, self.strategy
        deadline = time.monotonic() + fed.round_timeout_s
        replies = list(grid.send_and_receive(msgs, timeout=fed.round_timeout_s))
        latest = {client_of(m): m for m in msgs}
        resent: list[Message] = []
        events = []
        for attempt in range(1, fed.retries + 1):
            lost = st.lost(latest.values(), replies)
            left = deadline - time.monotonic()
            if not lost or left <= 0:
                break
            superseded = {latest[c].metadata.message_id for c in lost}
            replies = [r for r in replies if r.metadata.reply_to_message_id not in superseded]
            again = st.resend(lost, grid)
            latest.update((client_of(m), m) for m in again)
            events.append(f"{len(lost)} client(s) {sorted(lost)} lost ({next(iter(lost.values()))}): sent the round "
                          f"again (retry {attempt} of {fed.retries})")
            replies += grid.send_and_receive(again, timeout=left)
            resent += again
        return replies, resent, events

    def _client_eval(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> dict:
        msgs = list(self.strategy.configure_evaluate(rnd, to_record(arrays), ConfigRecord(), grid))
        if not msgs:
            return {}
        replies = grid.send_and_receive(msgs, timeout=self.scn.federation.round_timeout_s)
        return dict(self.strategy.aggregate_evaluate(rnd, replies) or {})

    def _server_eval(self, rnd: int, arrays: dict[str, np.ndarray]) -> dict:
        fed = self.scn.federation
        if rnd % fed.eval_every and rnd != fed.rounds:
            return {"eval_accuracy": None, "eval_loss": None}
        self.eval_model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        ds = self.fed.dataset
        out = evaluate(self.eval_model, ds.x_test, ds.y_test, batch_size=fed.eval_batch_size,
                       device=default_device())
        return {"eval_accuracy": out["accuracy"], "eval_loss": out["loss"]}

    # ------------------------------------------------------------- checkpoints
    def _meta(self, rnd: int, wall_s: float) -> dict[str, str]:
        return {"round": str(rnd), "config_sha256": config_sha256(self.scn), "wall_s": repr(wall_s),
                "aggregate_s": repr(self.totals["aggregate_s"]),
                "trajectory_sha256": config_sha256(self.scn, any_rounds=True),
                "trajectory": json.dumps(result_config(self.scn, any_rounds=True), sort_keys=True),
                "fedsim_version": fedsim.__version__, "partition_fingerprint": self.stats["fingerprint"]}

    def _maybe_checkpoint(self, rnd: int, arrays: dict[str, np.ndarray], wall_s: float) -> None:
        every = self.scn.output.checkpoint_every
        if not every or rnd % every:
            return
        path = checkpoint_path(self.out, rnd)
        snapshot_client_state(self.out / "client_state", snapshot_path(path))   # first: the file marks it complete
        state_arrays, skeleton = flatten(self.strategy.state_dict())
        tensors = {f"model.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        tensors.update({f"state/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_arrays.items()})
        save_checkpoint(path, tensors, {**self._meta(rnd, wall_s), "state": skeleton}, durable=True)
        prune_checkpoints(self.out, self.scn.output.keep_checkpoints)

    def _restore(self) -> tuple[int, dict[str, np.ndarray], list[dict]]:
        """The latest intact checkpoint: its round, model, server and client state; later rows are dropped."""
        tensors, meta, path = self._intact_checkpoint()
        self._check_same_setup(meta, path)
        done = int(meta["round"])
        self.totals.update(wall_s=float(meta.get("wall_s", 0.0)), aggregate_s=float(meta.get("aggregate_s", 0.0)))
        loaded = {k.removeprefix("model."): v.numpy() for k, v in tensors.items() if k.startswith("model.")}
        order = list(self.eval_model.state_dict())      # safetensors sorts names; the model's order matters
        if sorted(order) != sorted(loaded):
            raise ResumeError(f"{path} does not hold this scenario's model")
        state = {k.removeprefix("state/"): v.numpy() for k, v in tensors.items() if k.startswith("state/")}
        try:
            self.strategy.load_state_dict(unflatten(state, meta["state"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ResumeError(f"{path} has no readable server state ({exc}); it was written by another "
                              "fedsim version") from None
        self._check_client_state_resumes()
        restore_snapshot(snapshot_path(path), self.out / "client_state",
                         keep={p.name: p.keep_on_resume for p in self.client_plugins})
        for name in ("metrics.jsonl", CLIENTS_NAME):      # rewrite without the rounds after the checkpoint
            kept = [r for r in read_metrics(self.out, name) if r["round"] <= done] if (self.out / name).exists() else []
            with MetricsWriter(self.out, name=name, csv_name="metrics.csv" if name == "metrics.jsonl" else None) as w:
                for row in kept:
                    w.write(row)
        rows = read_metrics(self.out) if (self.out / "metrics.jsonl").exists() else []
        return done, {k: loaded[k] for k in order}, rows

    def _check_client_state_resumes(self) -> None:
        """On Flower's runtimes client state lives in the SuperNodes, not in the run directory."""
        stateful = [p.name for p in self.client_plugins if p.stateful]
        if self.scn.engine.kind not in ("flower", "ray") or not stateful:
            return
        message = (f"engine '{self.scn.engine.kind}' keeps client state in the SuperNodes, so {stateful} would "
                   "restart from empty client state and the resumed run would not be the run it continues")
        if not self.force:
            raise ResumeError(f"cannot resume {self.out}: {message}; resume on engine inprocess or workers "
                              "(--set engine.kind=workers), or pass --force")
        self.notes.append(f"{message} (--force)")

    def _intact_checkpoint(self) -> tuple[dict, dict[str, str], Path]:
        """The newest readable checkpoint; unreadable newer ones are reported and skipped."""
        problems = []
        for found in iter_intact(self.out):
            if len(found) == 2:
                path, exc = found
                problems.append(f"{path} is unreadable ({type(exc).__name__}: {exc})")
                continue
            path, tensors, meta = found
            self.notes += [f"{p}; resuming from the previous checkpoint" for p in problems]
            return tensors, meta, path
        if problems:
            raise ResumeError(f"{self.out} has no intact checkpoint:\n  " + "\n  ".join(problems))
        raise ResumeError(f"{self.out} has no checkpoints to resume from (set output.checkpoint_every)")

    def _check_same_setup(self, meta: dict[str, str], path: Path) -> None:
        """Refuse (unless forced) when the scenario, partition or fedsim version differ from the checkpoint's."""
        if "trajectory" in meta:
            diffs = config_diff(json.loads(meta["trajectory"]), result_config(self.scn, any_rounds=True))
        elif meta.get("trajectory_sha256") != config_sha256(self.scn, any_rounds=True):
            diffs = ["the scenario (this checkpoint does not record which fields)"]
        else:
            diffs = []
        for key, now in (("partition_fingerprint", self.stats["fingerprint"]), ("fedsim_version", fedsim.__version__)):
            if meta.get(key) != now:
                diffs.append(f"{key}: {meta.get(key)!r} -> {now!r}")
        if not diffs:
            return
        listing = "\n  - ".join(diffs)
        if not self.force:
            raise ResumeError(f"cannot resume {self.out}: this run's setup differs from the one {path.name} was "
                              f"made with:\n  - {listing}\nstart a new run (another --out), or pass --force to "
                              "resume anyway")
        self.notes.append(f"resuming despite differences from {path.name} (--force): {'; '.join(diffs)}")

    # ------------------------------------------------------------------ files
    def _prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", to_yaml(self.scn))
        write_json(self.out / "partition.json", self.stats)

    def _partition_line(self) -> str:
        from fedsim.data import heterogeneity_line
        return heterogeneity_line(self.stats)

    def _finish(self, rows: list[dict], arrays: dict[str, np.ndarray], wall_s: float) -> dict:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        save_checkpoint(self.out / "model.safetensors", tensors, self._meta(len(rows), wall_s))
        summary = build_summary(rows, name=self.scn.name, seed=self.scn.seed, config_sha256=config_sha256(self.scn),
                                engine=self.scn.engine.kind, wall_s=wall_s, aggregate_s=self.totals["aggregate_s"],
                                fedsim_version=fedsim.__version__,
                                extra={"partition_fingerprint": self.stats["fingerprint"],
                                       "num_clients": self.fed.num_clients, "clients_per_round": self.fed.cohort_size,
                                       **({"epsilon": eps[-1]} if (eps := [r["epsilon_max"] for r in rows
                                                                          if r.get("epsilon_max") is not None]) else {}),
                                       **self.strategy.run_summary(rows)})
        write_json(self.out / "summary.json", summary)
        plot_run(self.out, lr_schedule=self.scn.lr_schedule is not None)
        return summary
