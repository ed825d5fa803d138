"""Client workers killed mid-round: 10 clients on 10 workers, ``fedsim run`` through the CLI, and
2 workers SIGKILLed (by PID, read from their logs) while they train round 3 and again round 6.

Two policies are checked against the fault-free run with the same seed:

- the default (``retries: 1``): the lost clients are sent the round again, to the restarted
  workers, so the run is the fault-free one bit for bit;
- ``retries: 0, min_replies: 0.8``: rounds 3 and 6 aggregate the 8 replies that came, and the
  final accuracy stays within 1 point of the fault-free run's.

Catches a dead worker that hangs the round, a server that crashes on the lost replies, a worker
that is not restarted (its clients lost for the rest of the run), a retry that is not made or is
sent to the dead worker, and a ``min_replies`` that skips rounds it should aggregate.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.results import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = """\
name: faults
seed: 5
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 10, alpha: 1.0, min_size: 20}
model: {name: mlp, options: {hidden: [128]}}
federation:
  rounds: 15
  clients_per_round: 10
  eval_every: 5
  local: {steps: 300, batch_size: 32, lr: 0.05}
engine: {kind: workers, workers: 10}
"""
VICTIMS, KILL_ROUNDS = (2, 7), (3, 6)


def _pid_serving(log: Path, rnd: int) -> int | None:
    """The PID of the worker process whose log says it has started on round ``rnd``."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    found = re.findall(rf"\(pid (\d+)\): round {rnd}, client \d+, train", text)
    return int(found[-1]) if found else None


def _run(tmp_path: Path, name: str, text: str = SCENARIO, kill: bool = False) -> Path:
    """``fedsim run`` on ``text``; with ``kill``, SIGKILL the victims as each starts a kill round."""
    scenario, out = tmp_path / f"{name}.yaml", tmp_path / name
    scenario.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pending = [(rnd, w) for rnd in KILL_ROUNDS for w in VICTIMS] if kill else []
    try:
        deadline = time.monotonic() + 500
        while pending and proc.poll() is None and time.monotonic() < deadline:
            for rnd, w in list(pending):
                pid = _pid_serving(out / "logs" / f"worker-{w}.log", rnd)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)        # a worker of this run, by PID, mid-round
                    pending.remove((rnd, w))
            time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert not pending, f"workers never started rounds {pending}"
    assert proc.returncode == 0, stderr[-3000:]
    print(f"  {name}: {stdout.strip()}")
    return out


def _killed_mid_round(rows: list[dict]) -> None:
    for rnd in KILL_ROUNDS:
        events = " | ".join(rows[rnd - 1].get("events", []))
        for w in VICTIMS:
            assert f"worker {w} (cpu) died (exit code -9) during the round" in events, (rnd, events)


def test_two_of_ten_workers_killed_mid_round_at_rounds_3_and_6(tmp_path):
    clean = _run(tmp_path, "clean")
    retried = _run(tmp_path, "retried", kill=True)
    partial = _run(tmp_path, "partial", SCENARIO.replace("  eval_every: 5\n",
                                                         "  eval_every: 5\n  retries: 0\n  min_replies: 0.8\n"),
                   kill=True)

    acc = {d.name: read_metrics(d)[-1]["eval_accuracy"] for d in (clean, retried, partial)}
    a, b = load_file(str(clean / "model.safetensors")), load_file(str(retried / "model.safetensors"))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"\n  final accuracy: fault-free {100 * acc['clean']:.2f}%, killed + retry {100 * acc['retried']:.2f}% "
          f"(max parameter difference {diff}), killed + 8 of 10 aggregated {100 * acc['partial']:.2f}%")

    rows = read_metrics(retried)
    _killed_mid_round(rows)
    assert [r["clients"] for r in rows] == [10] * 15 and not any(r["rejected"] for r in rows)
    assert diff == 0.0

    rows = read_metrics(partial)
    _killed_mid_round(rows)
    assert [r["clients"] for r in rows] == [10, 10, 8, 10, 10, 8] + [10] * 9
    assert not any(r.get("skipped") for r in rows)
    assert abs(acc["partial"] - acc["clean"]) <= 0.01
