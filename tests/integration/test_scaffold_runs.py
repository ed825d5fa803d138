"""SCAFFOLD end to end: the scenario key, accuracy against FedAvg on a skewed split, and exact
resume of a run that crashed after its clients' state moved past the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from clients.app import app as client_app
from fedsim.engine import run_scenario
from fedsim.engine.inprocess import InProcessGrid, run_server_app
from fedsim.federation import get_federation
from fedsim.flower.codec import load_client_state, make_run_config
from fedsim.flower.state_store import load_state
from fedsim.results import read_json, read_metrics
from fedsim.scenario import load_scenario, parse_scenario
from server.app import app as server_app

ROOT = Path(__file__).resolve().parents[2]


def _model(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_scaffold_round_one_is_fedavg_then_corrects(tmp_path, tiny_yaml):
    """All control variates start at 0, so round 1 is FedAvg bit for bit; later rounds differ
    (catches a correction applied before any client has a c_i, or never applied)."""
    base = tiny_yaml + "engine: {kind: inprocess}\n"
    one = base.replace("rounds: 3", "rounds: 1")
    run_scenario(parse_scenario(one), tmp_path / "avg1", progress="none")
    run_scenario(parse_scenario(one + "strategy: {name: scaffold}\n"), tmp_path / "sc1", progress="none")
    a, b = _model(tmp_path / "avg1"), _model(tmp_path / "sc1")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    run_scenario(parse_scenario(base), tmp_path / "avg", progress="none")
    run_scenario(parse_scenario(base + "strategy: {name: scaffold}\n"), tmp_path / "sc", progress="none")
    a, b = _model(tmp_path / "avg"), _model(tmp_path / "sc")
    assert any(not np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_scaffold_is_not_worse_than_fedavg_on_the_skewed_quickstart(tmp_path, capsys):
    """Quickstart at Dirichlet 0.1 with plain local SGD (momentum 0): SCAFFOLD's final accuracy is
    at most 2 points below FedAvg's (fixed seed; both figures are printed)."""
    acc = {}
    for name in ("fedavg", "scaffold"):
        scn = load_scenario(ROOT / "scenarios/quickstart.yaml",
                            ["engine.kind=inprocess", "data.partition.alpha=0.1", "federation.local.momentum=0",
                             f"strategy.name={name}"])
        acc[name] = run_scenario(scn, tmp_path / name, progress="none")["final_accuracy"]
        last5 = np.mean([r["eval_accuracy"] for r in read_metrics(tmp_path / name)[-5:]])
        with capsys.disabled():
            print(f"\n  quickstart Dirichlet 0.1, momentum 0: {name} final {100 * acc[name]:.2f}%, "
                  f"mean of the last 5 rounds {100 * last5:.2f}%")
    assert acc["scaffold"] >= acc["fedavg"] - 0.02


class Crash(Exception):
    """Stands for the process being killed."""


class CrashingGrid(InProcessGrid):
    """Dies when asked to deliver round ``crash_round``'s messages (after the previous round finished)."""

    crash_round = 5

    def _deliver(self, msgs, timeout):
        if int(msgs[0].content["config"]["server-round"]) == self.crash_round:
            raise Crash()
        return super()._deliver(msgs, timeout)


def test_scaffold_killed_after_round_4_resumes_bit_identically(tmp_path, tiny_yaml):
    """Checkpoint at round 3, crash after round 4 (so the clients' c_i moved on), resume: the
    model and every client's c_i equal a straight run's (catches a resume that keeps the clients'
    round-4 state instead of the snapshot, or that loses the server's c)."""
    text = tiny_yaml.replace("rounds: 3", "rounds: 6") + \
        "engine: {kind: inprocess}\nstrategy: {name: scaffold}\noutput: {checkpoint_every: 3}\n"
    scn = parse_scenario(text)
    run_scenario(scn, tmp_path / "straight", progress="none")

    cut = tmp_path / "cut"
    run_config = make_run_config(scn, cut, "none")
    grid = CrashingGrid(client_app, get_federation(scn).num_clients, run_config, state_dir=cut / "client_state")
    with pytest.raises(Crash):
        run_server_app(server_app, grid, run_config)
    assert [r["round"] for r in read_metrics(cut)] == [1, 2, 3, 4]
    run_scenario(scn, cut, progress="none", resume=True)

    a, b = _model(tmp_path / "straight"), _model(cut)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in read_metrics(cut)] == list(range(1, 7))
    assert [r["round"] for r in read_metrics(cut, "clients.jsonl")] == \
        [r["round"] for r in read_metrics(tmp_path / "straight", "clients.jsonl")]
    for cid in range(get_federation(scn).num_clients):
        node = 1000 + cid
        sa = load_client_state(load_state(tmp_path / "straight" / "client_state", node), cid, "scaffold")
        sb = load_client_state(load_state(cut / "client_state", node), cid, "scaffold")
        assert (sa is None) == (sb is None)
        if sa is not None:
            assert all(np.array_equal(sa["c_i"][k], sb["c_i"][k]) for k in sa["c_i"])
    assert read_json(cut / "summary.json")["rounds_completed"] == 6


def test_scaffold_needs_local_sgd(tiny_yaml):
    from fedsim.scenario import ScenarioError
    with pytest.raises(ScenarioError, match="federation.local.optimizer: strategy 'scaffold' needs local SGD"):
        parse_scenario(tiny_yaml.replace("lr: 0.1}", "lr: 0.1, optimizer: adam}") + "strategy: {name: scaffold}\n")
