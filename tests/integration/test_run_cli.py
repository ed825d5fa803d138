"""End to end: `fedsim run` on the quickstart scenario (3 rounds, default engine) writes every result file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.cli import main
from fedsim.engine import run_scenario
from fedsim.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"round", "eval_accuracy", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_down", "wall_s",
            "client_compute_s"}
SUMMARY_KEYS = {"final_accuracy", "best_accuracy", "rounds_completed", "wall_s", "client_compute_s", "overhead_ratio",
                "seed", "config_sha256", "fedsim_version", "engine"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(ROOT / "scenarios/quickstart.yaml"),
                           "--out", str(out), "--set", "federation.rounds=3"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "quickstart: 3 rounds, final accuracy" in proc.stdout
    assert "partition dirichlet: 20 clients" in proc.stderr and "round 3/3" in proc.stderr
    return out


def test_every_result_file(quick_run):
    for name in ("config.yaml", "partition.json", "metrics.jsonl", "metrics.csv", "summary.json",
                 "model.safetensors", "plots/accuracy.png", "plots/loss.png"):
        assert (quick_run / name).is_file(), name
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert all(r["clients"] == 10 and r["bytes_up"] > 10 * 50_000 and r["bytes_down"] > 10 * 50_000 for r in rows)
    summary = json.loads((quick_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["rounds_completed"] == 3 and summary["engine"] == "workers"   # the default engine
    assert summary["final_accuracy"] == rows[-1]["eval_accuracy"] > 0.3
    part = json.loads((quick_run / "partition.json").read_text())
    assert len(part["sizes"]) == 20 and sum(part["sizes"]) + part["dropped"] == 1437
    assert len(part["fingerprint"]) == 64 and 0 < part["mean_tv_distance"] < 1
    weights = load_file(str(quick_run / "model.safetensors"))
    assert all(np.isfinite(w).all() for w in weights.values())


def test_bytes_are_the_serialized_size(quick_run):
    """Downlink bytes per client exceed the raw float32 payload but only by message overhead."""
    weights = load_file(str(quick_run / "model.safetensors"))
    raw = sum(w.nbytes for w in weights.values())
    row = json.loads((quick_run / "metrics.jsonl").read_text().splitlines()[0])
    per_client = row["bytes_down"] / row["clients"]
    assert raw < per_client < raw * 1.05 + 4096


def test_same_seed_same_model(tmp_path, tiny_yaml):
    tiny_yaml += "engine: {kind: inprocess}\n"
    a = run_scenario(parse_scenario(tiny_yaml), tmp_path / "a", progress="none")
    b = run_scenario(parse_scenario(tiny_yaml), tmp_path / "b", progress="none")
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert a["partition_fingerprint"] == b["partition_fingerprint"]
    c = run_scenario(parse_scenario(tiny_yaml.replace("seed: 3", "seed: 4")), tmp_path / "c", progress="none")
    assert c["partition_fingerprint"] != a["partition_fingerprint"]


def test_report_compares_runs(tmp_path, tiny_yaml, capsys):
    tiny_yaml += "engine: {kind: inprocess}\n"
    for name in ("one", "two"):
        run_scenario(parse_scenario(tiny_yaml.replace("name: tiny", f"name: {name}")), tmp_path / name,
                     progress="none")
    plot = tmp_path / "cmp.png"
    assert main(["report", str(tmp_path / "one"), str(tmp_path / "two"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "one" in out and "two" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_overwrite_a_run(tmp_path, tiny_yaml):
    path = tmp_path / "s.yaml"
    path.write_text(tiny_yaml.replace("rounds: 3", "rounds: 1") + "engine: {kind: inprocess}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize("path", ["fmnist-dirichlet.yaml", "shakespeare.yaml"])
def test_one_round_smoke_of_real_data_scenarios(tmp_path, path):
    """A 1-round run of the bigger scenarios, cut down; skipped where the data set is not installed."""
    from fedsim.data import DataUnavailableError
    overrides = ["federation.rounds=1", "federation.clients_per_round=2", "federation.local.steps=2",
                 "federation.local.epochs=null", "output.checkpoint_every=1"]
    if path.startswith("fmnist"):
        overrides.append("data.options.max_test=500")
    else:
        overrides += ["data.options.max_roles=6", "data.options.max_samples_per_role=50"]
    scn = load_scenario(ROOT / "scenarios" / path, overrides)
    try:
        summary = run_scenario(scn, tmp_path, progress="none")
    except DataUnavailableError as exc:
        pytest.skip(str(exc))
    assert summary["rounds_completed"] == 1 and 0 <= summary["final_accuracy"] <= 1
    assert (tmp_path / "checkpoints" / "round-00001.safetensors").is_file()
