"""Every strategy and the optional client-side evaluation run end to end (in-process, 2 rounds)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.engine import run_scenario
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario


def _run(tmp_path, text: str, name: str) -> tuple[list[dict], dict]:
    run_scenario(parse_scenario(text + "engine: {kind: inprocess}\n"), tmp_path / name, progress="none")
    return read_metrics(tmp_path / name), load_file(str(tmp_path / name / "model.safetensors"))


@pytest.mark.parametrize("strategy", ["{name: fedavgm, server_momentum: 0.5}", "{name: fedadam, server_lr: 0.01}",
                                      "{name: fedprox, proximal_mu: 1.0}"])
def test_strategies_train_and_differ_from_fedavg(tmp_path, tiny_yaml, strategy):
    text = tiny_yaml.replace("rounds: 3", "rounds: 2")
    _, plain = _run(tmp_path, text, "fedavg")
    rows, other = _run(tmp_path, text + f"strategy: {strategy}\n", "other")
    assert all(np.isfinite(r["eval_loss"]) for r in rows)
    assert any(not np.array_equal(plain[k], other[k]) for k in plain)


def test_client_side_evaluation(tmp_path, tiny_yaml):
    text = tiny_yaml.replace("rounds: 3", "rounds: 2").replace("clients_per_round: 3",
                                                              "clients_per_round: 3\n  client_eval_every: 2")
    rows, _ = _run(tmp_path, text, "ce")
    assert "client_eval_accuracy" not in rows[0]
    assert rows[1]["client_eval_clients"] == 3 and 0 <= rows[1]["client_eval_accuracy"] <= 1
