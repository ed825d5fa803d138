"""The flower engine: real flower-superlink + flower-supernode processes on 127.0.0.1.

Slow (Flower's deployment runtime starts a process per message and polls every few
seconds): marked ``slow``; CI runs it after the default tier.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.engine import run_scenario
from fedsim.scenario import parse_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pids_alive(pids: list[int]) -> list[int]:
    import os
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_same_model_as_inprocess_and_nothing_left_behind(tmp_path, tiny_yaml, monkeypatch):
    """Parity: the final global model equals the in-process one (CPU, max abs diff <= 1e-6)."""
    from fedsim.engine import flower as flower_engine

    started: list[int] = []
    original = flower_engine.LocalFederation._spawn

    def spawn(self, name, args, log):
        original(self, name, args, log)
        started.append(self.procs[-1].pid)

    monkeypatch.setattr(flower_engine.LocalFederation, "_spawn", spawn)
    text = tiny_yaml.replace("rounds: 3", "rounds: 2")
    run_scenario(parse_scenario(text + "engine: {kind: inprocess}\n"), tmp_path / "a", progress="none")
    summary = run_scenario(parse_scenario(text + "engine: {kind: flower, supernodes: 2}\n"), tmp_path / "b",
                           progress="none")
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    assert summary["engine"] == "flower" and summary["rounds_completed"] == 2
    assert len(started) == 3 and _pids_alive(started) == []
    assert (tmp_path / "b/logs/serverapp.log").read_text().strip()
