"""End to end: `fedsim sweep` through the real CLI trains a 2 x 1 grid x 2 methods x 2 seeds of digits/MLP
cells (1 round each, engine inprocess), writes every output, and a second invocation trains nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedsim.cli import main

BASE = """\
name: sweep-it
seed: 0
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 6, alpha: 0.5, min_size: 5}
model: {name: mlp, options: {hidden: [16]}}
federation:
  rounds: 1
  clients_per_round: 3
  local: {steps: 3, batch_size: 16, lr: 0.1}
engine: {kind: inprocess}
"""

GRID = """\
scenario: base.yaml
out: sweep-out
seeds: [0, 1]
target: 0.2
axes:
  lr: {key: federation.local.lr, label: local LR, values: [0.05, 0.2]}
  steps: {key: federation.local.steps, values: [3]}
methods:
  fedavg: {label: FedAvg, overrides: [strategy.name=fedavg]}
  prox: {label: FedProx, overrides: [strategy.name=fedprox, strategy.proximal_mu=0.1]}
baseline: fedavg
"""


@pytest.mark.timeout(120)
def test_sweep_runs_writes_tables_and_resumes(tmp_path, monkeypatch, capsys):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "base.yaml").write_text(BASE)
    (tmp_path / "grid" / "grid.yaml").write_text(GRID)
    monkeypatch.chdir(tmp_path)                  # out: is relative to the cwd, scenario: to the grid file

    import fedsim.engine
    real, calls = fedsim.engine.run_scenario, []

    def counting(scn, out_dir, **kw):
        calls.append(Path(out_dir).name)
        return real(scn, out_dir, **kw)
    monkeypatch.setattr(fedsim.engine, "run_scenario", counting)

    assert main(["sweep", "grid/grid.yaml"]) == 0
    out = tmp_path / "sweep-out"
    stdout = capsys.readouterr().out
    assert len(calls) == 8 and stdout.count("] ") >= 8 and "[8/8] prox__lr=0.2__steps=3__seed=1: final" in stdout
    for name in ("sweep.json", "table.csv", "table.md", "table_seeds.csv", "compare.md", "heatmap_fedavg.png",
                 "heatmap_prox.png", "gain_prox.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for cell in calls:
        assert {"summary.json", "metrics.jsonl", "config.yaml"} <= {p.name for p in (out / "cells" / cell).iterdir()}

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["complete"] and sweep["counts"]["done"] == 8
    by_id = {c["id"]: c for c in sweep["cells"]}
    for c in sweep["cells"]:
        summary = json.loads((out / c["dir"] / "summary.json").read_text())
        assert c["config_sha256"] == summary["config_sha256"] and c["final_accuracy"] == summary["final_accuracy"]
        assert summary["seed"] == c["seed"] and c["rounds"] == 1
    prox = by_id["prox__lr=0.05__steps=3__seed=1"]
    base = by_id["fedavg__lr=0.05__steps=3__seed=1"]
    assert prox["gain_pts"] == pytest.approx(100 * (prox["final_accuracy"] - base["final_accuracy"]))

    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["cell"] for r in rows] == calls and {r["status"] for r in rows} == {"done"}
    seeds = list(csv.DictReader((out / "table_seeds.csv").open()))
    assert len(seeds) == 4 and {r["seeds_done"] for r in seeds} == {"2"}
    assert (out / "compare.md").read_text().splitlines()[0].startswith("| local LR | steps | FedAvg acc % | FedAvg r@20%")

    stamps = {c: (out / "cells" / c / "summary.json").stat().st_mtime_ns for c in calls}
    assert main(["sweep", "grid/grid.yaml"]) == 0                       # the second invocation trains nothing
    assert len(calls) == 8
    assert {c: (out / "cells" / c / "summary.json").stat().st_mtime_ns for c in calls} == stamps
    assert "8 done of 8 cell(s)" in capsys.readouterr().out
