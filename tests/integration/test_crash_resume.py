"""SIGKILL of a running ``fedsim run`` after a checkpoint, then ``fedsim run --resume``: the final
model is bit-identical to a straight run's and every metrics row (timings aside) is the same, for
FedAvg, DiceSGD with persisted error feedback, SCAFFOLD and AutoFLIP; a DP run's ε is never below
the straight run's (the ledger never rolls back; the error feedback does, with the model).

The kill is real: the server process is killed by PID with SIGKILL the moment the round-4
checkpoint exists, so whatever it was doing (training round 5, writing metrics) is cut short.
Catches any state that determines the rest of the run but is not in the checkpoint: server
optimizer moments, SCAFFOLD's c and c_i, DiceSGD's per-client error, AutoFLIP's mask and phase,
privacy ledgers, RNG streams, and metrics rows written after the checkpoint but not dropped; and
algorithm state rolled forward by a client that finished the killed round (DiceSGD's error
feedback on the workers engine, which a whole-record "keep on resume" used to keep)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.results import read_metrics

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
name: crash
seed: 11
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 6, alpha: 0.5, min_size: 20}
model: {name: mlp, options: {hidden: [32]}}
federation:
  rounds: 10
  clients_per_round: 3
  eval_every: 2
  local: {epochs: 2, batch_size: 8, lr: 0.05, momentum: 0.9}
output: {checkpoint_every: 2}
"""
CASES = {
    "fedavgm": "strategy: {name: fedavgm, server_momentum: 0.9}\n",
    "dicesgd": "privacy: {mechanism: dicesgd, noise_multiplier: 1.0, persist_error: true, clip: 1.0, "
               "accountant: rdp, delta: 1.0e-3}\n",
    "scaffold": "strategy: {name: scaffold}\n",
    "autoflip": "pruning: {sparsity: 0.3, explore_epochs: 2, patience: 2, explore_batch_size: 32, explore_lr: 0.01}\n",
}
#: Row keys that measure time, not state.
TIMING = ("wall_s", "round_s", "compute_s", "client_compute_s", "aggregate_s", "events")


def _cli(scenario: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(out), "--quiet", *extra]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _crash_after_checkpoint(scenario: Path, out: Path, checkpoint_round: int) -> None:
    """Start the run, SIGKILL its process the moment round ``checkpoint_round``'s checkpoint exists."""
    target = out / "checkpoints" / f"round-{checkpoint_round:05d}.safetensors"
    proc = subprocess.Popen(_cli(scenario, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not target.exists():
            assert proc.poll() is None, f"the run ended before its checkpoint: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the kill came too late to cut the run short"


def _check(tmp_path: Path, case: str, engine: str) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(BASE + CASES[case] + f"engine: {{kind: {engine}}}\n")
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    subprocess.run(_cli(scenario, straight), cwd=ROOT, check=True, timeout=600)
    _crash_after_checkpoint(scenario, cut, 4)
    resumed = subprocess.run(_cli(scenario, cut, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"\n{case} on {engine}: max |straight - resumed| = {diff}")
    assert diff == 0.0 and all(np.array_equal(a[k], b[k]) for k in a)
    # Privacy ledgers never roll back: steps of the killed round that a client finished before the
    # kill are counted again when the round is re-run, so epsilon may only be larger than straight.
    spent = ("epsilon", "dp_steps_total")
    strip = (lambda rows: [{k: v for k, v in r.items() if not k.startswith(spent)} for r in rows])
    assert strip(_untimed(read_metrics(cut))) == strip(_untimed(read_metrics(straight)))
    if (straight / "privacy.json").exists():
        before, after = (json.loads((d / "privacy.json").read_text())["clients"] for d in (straight, cut))
        assert set(before) == set(after)
        for cid in before:
            assert after[cid]["epsilon"] >= before[cid]["epsilon"], cid
            assert sum(e["steps"] for e in after[cid]["events"]) >= sum(e["steps"] for e in before[cid]["events"])
    if (straight / "pruning.json").exists():
        assert json.loads((cut / "pruning.json").read_text()) == json.loads((straight / "pruning.json").read_text())


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == "fedavgm" else [pytest.mark.slow]) for c in CASES])
def test_sigkill_and_resume_is_bit_identical_inprocess(tmp_path, case):
    """FedAvgM in the default tier (server momentum is state); the other three in the slow tier."""
    _check(tmp_path, case, "inprocess")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_resume_is_bit_identical_on_workers(tmp_path, case):
    _check(tmp_path, case, "workers")
