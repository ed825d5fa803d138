"""The server loop behind ``server/app.py``: rounds, evaluation, metrics, checkpoints, summary.

Flower's ``Strategy.start`` has no progress, no per-round files and no checkpoints, so the
ServerApp drives the same Strategy methods itself. It runs unchanged on any Grid: the
in-process one, the worker pool, or a SuperLink.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid

import fedsim
from fedsim.algorithms.fedhyper import state_from_arrays, state_to_arrays
from fedsim.runtime import default_device
from fedsim.errors import RunError
from fedsim.federation import Federation, get_federation
from fedsim.flower.codec import (MIN_NODES_KEY, NODE_WAIT_KEY, OUT_DIR_KEY, PROGRESS_KEY, RESUME_KEY, SHIP_KEY,
                                 from_record, scenario_from_config, to_record)
from fedsim.flower.strategy import FedsimStrategy
from fedsim.progress import RoundProgress
from fedsim.results import (MetricsWriter, build_summary, bundle, load_checkpoint, plot_run, read_metrics,
                            save_checkpoint, write_json)
from fedsim.scenario import Scenario, config_sha256, to_yaml
from fedsim.train import evaluate


class ResumeError(RunError):
    """A run directory that cannot be resumed (no checkpoint, or a different scenario)."""


def serve(grid: Grid, context: Context) -> dict:
    """Run the whole federation described by the run config on ``grid``; returns the summary."""
    scn = scenario_from_config(context.run_config)
    ship = str(context.run_config.get(SHIP_KEY, "")).lower() == "true"
    out_dir = Path(str(context.run_config.get(OUT_DIR_KEY) or "") or tempfile.mkdtemp(prefix=f"fedsim-{scn.name}-"))
    mode = str(context.run_config.get(PROGRESS_KEY, "auto"))
    wait_for_nodes(grid, int(context.run_config.get(MIN_NODES_KEY, 1)),
                   float(context.run_config.get(NODE_WAIT_KEY, 120.0)))
    resume = str(context.run_config.get(RESUME_KEY, "")).lower() == "true"
    summary = ServerLoop(scn, out_dir, mode, resume).run(grid)
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

    def __init__(self, scenario: Scenario, out_dir: Path, progress: str = "auto", resume: bool = False):
        self.scn, self.out, self.resume = scenario, out_dir, resume
        self.fed: Federation = get_federation(scenario)
        self.strategy = FedsimStrategy(self.fed)
        self.progress_mode = progress
        self.eval_model = self.fed.build_model()
        self.stats = self.fed.stats()
        self.totals = {"aggregate_s": 0.0, "wall_s": 0.0}    # carried over from a checkpoint on resume

    def run(self, grid: Grid) -> dict:
        """Train for ``federation.rounds`` rounds and write every result file."""
        done, arrays, rows = self._restore() if self.resume else (0, self.fed.initial_arrays(), [])
        self._prepare()
        start = time.perf_counter() - self.totals["wall_s"]
        with MetricsWriter(self.out, append=self.resume) as sink, \
                RoundProgress(self.scn.federation.rounds, self.progress_mode) as bar:
            bar.note(self._partition_line() + (f"; resuming after round {done}" if done else ""))
            for rnd in range(done + 1, self.scn.federation.rounds + 1):
                arrays, row = self._round(grid, rnd, arrays, start)
                sink.write(row)
                rows.append(row)
                bar.update(rnd, row)
                if not row["clients"]:
                    bar.note(f"[yellow]round {rnd}: no client reply was accepted[/yellow] "
                             f"({'; '.join(row.get('rejected_reasons', []))[:300]})")
                self._maybe_checkpoint(rnd, arrays, time.perf_counter() - start)
        summary = self._finish(rows, arrays, time.perf_counter() - start)
        if rows and not any(r["clients"] for r in rows):
            raise RunError(f"no client reply was accepted in any round; the reasons are in {self.out}/metrics.jsonl "
                           "(rejected_reasons)")
        return summary

    def _restore(self) -> tuple[int, dict[str, np.ndarray], list[dict]]:
        """The latest checkpoint: its round, model and server-optimizer state; later metric rows are dropped."""
        ckpts = sorted((self.out / "checkpoints").glob("round-*.safetensors"))
        if not ckpts:
            raise ResumeError(f"{self.out} has no checkpoints to resume from (set output.checkpoint_every)")
        tensors, meta = load_checkpoint(ckpts[-1])
        for key, want in (("trajectory_sha256", config_sha256(self.scn, any_rounds=True)),
                          ("partition_fingerprint", self.stats["fingerprint"])):
            if meta.get(key) != want:
                raise ResumeError(f"cannot resume {self.out}: its {key} differs from this scenario's "
                                  "(the data, model or settings changed); start a new run instead")
        done = int(meta["round"])
        self.totals.update(wall_s=float(meta.get("wall_s", 0.0)), aggregate_s=float(meta.get("aggregate_s", 0.0)))
        loaded = {k.removeprefix("model."): v.numpy() for k, v in tensors.items() if k.startswith("model.")}
        order = list(self.eval_model.state_dict())      # safetensors sorts names; the model's order matters
        if sorted(order) != sorted(loaded):
            raise ResumeError(f"{ckpts[-1]} does not hold this scenario's model")
        arrays = {k: loaded[k] for k in order}
        opt = {k.removeprefix("server_opt."): v.numpy() for k, v in tensors.items() if k.startswith("server_opt.")}
        self.strategy.opt_state = state_from_arrays(opt) if opt else {}
        rows = [r for r in read_metrics(self.out) if r["round"] <= done] if (self.out / "metrics.jsonl").exists() else []
        with MetricsWriter(self.out) as sink:       # rewrite without the rounds after the checkpoint
            for row in rows:
                sink.write(row)
        return done, arrays, rows

    def _prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(self.scn), encoding="utf-8")
        write_json(self.out / "partition.json", self.stats)

    def _partition_line(self) -> str:
        from fedsim.data import heterogeneity_line
        return heterogeneity_line(self.stats)

    def _round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], start: float) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        st = self.strategy
        msgs = list(st.configure_train(rnd, to_record(arrays), ConfigRecord(), grid))
        replies = grid.send_and_receive(msgs, timeout=self.scn.federation.round_timeout_s)
        new_rec, train_metrics = st.aggregate_train(rnd, replies)
        if new_rec is not None:
            arrays = from_record(new_rec)
        self.totals["aggregate_s"] += st.round_log.get("aggregate_s", 0.0)
        row: dict[str, Any] = {"round": rnd, **dict(train_metrics or {})}
        row.update(bytes_down=st.round_log["bytes_down"], bytes_up=st.round_log["bytes_up"])
        row.update(self._client_eval(grid, rnd, arrays))
        row.update(self._server_eval(rnd, arrays))
        if st.round_log.get("rejected"):
            row["rejected_reasons"] = [f"client {c}: {r}" for c, r in st.round_log["rejected"]]
        row.update(round_s=time.perf_counter() - t0, wall_s=time.perf_counter() - start)
        return arrays, row

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

    def _maybe_checkpoint(self, rnd: int, arrays: dict[str, np.ndarray], wall_s: float) -> None:
        every = self.scn.output.checkpoint_every
        if every and rnd % every == 0:
            tensors = {f"model.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            tensors.update({f"server_opt.{k}": torch.from_numpy(v)
                            for k, v in state_to_arrays(self.strategy.opt_state).items()})
            save_checkpoint(self.out / "checkpoints" / f"round-{rnd:05d}.safetensors", tensors,
                            self._meta(rnd, wall_s))

    def _meta(self, rnd: int, wall_s: float) -> dict[str, str]:
        return {"round": str(rnd), "config_sha256": config_sha256(self.scn), "wall_s": repr(wall_s),
                "aggregate_s": repr(self.totals["aggregate_s"]),
                "trajectory_sha256": config_sha256(self.scn, any_rounds=True), "fedsim_version": fedsim.__version__,
                "partition_fingerprint": self.stats["fingerprint"]}

    def _finish(self, rows: list[dict], arrays: dict[str, np.ndarray], wall_s: float) -> dict:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        save_checkpoint(self.out / "model.safetensors", tensors, self._meta(len(rows), wall_s))
        summary = build_summary(rows, name=self.scn.name, seed=self.scn.seed, config_sha256=config_sha256(self.scn),
                                engine=self.scn.engine.kind, wall_s=wall_s, aggregate_s=self.totals["aggregate_s"],
                                fedsim_version=fedsim.__version__,
                                extra={"partition_fingerprint": self.stats["fingerprint"],
                                       "num_clients": self.fed.num_clients, "clients_per_round": self.fed.cohort_size})
        write_json(self.out / "summary.json", summary)
        plot_run(self.out)
        return summary

