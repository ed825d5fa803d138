"""A stage before round 1 (round 0, claimed by a plugin, as AutoFLIP's exploration will be), end
to end through the ServerApp loop and the real client handler: it runs once, shifts no training
round (the model after it equals FedAvg's bit for bit), and is not run again on resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import fedsim.flower.client as handler
import fedsim.flower.runner as runner
from fedsim.builder import Algorithms, build
from fedsim.core import ArraySpec, ClientPlugin, ClientResult, ClientRound, PluginUpdate, ServerPlugin
from fedsim.engine import run_scenario
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario

CALLS: list[tuple[int, int]] = []


class ExploreServer(ServerPlugin):
    name = "explore"

    def init(self, params):
        return {"done": False, "explorers": []}

    def phase(self, state, server_round):
        return "explore" if server_round == 0 and not state["done"] else None

    def sample(self, state, server_round):
        return [0, 2, 4]

    def uplink(self, state, server_round, phase, specs):
        return specs, ({"dev": {"sq": ArraySpec((1,), np.dtype(np.float32))}} if phase == "explore" else {})

    def aggregate(self, state, result):
        if result.phase != "explore":
            return PluginUpdate(state)
        return PluginUpdate({"done": True, "explorers": [r.cid for r in result.replies]})

    def metrics(self, state):
        return {"explored": len(state["explorers"])}


class _Round(ClientRound):
    def __init__(self, phase):
        self.phase = phase

    def procedure(self, run, rounds):
        if self.phase != "explore":
            return None
        CALLS.append((run.server_round, run.client_id))
        g = run.generator("explore")                     # its own stream: the training streams are untouched
        with torch.no_grad():
            for p in run.trainable().values():
                p.add_(torch.randn(p.shape, generator=g))
        return {"train_loss": 0.0, "steps": 0, "compute_s": 0.0}

    def finish(self, run, model):
        if self.phase != "explore":
            return ClientResult()
        sq = sum(float(((p.detach() - torch.from_numpy(model[k])) ** 2).sum()) for k, p in run.trainable().items())
        return ClientResult(arrays={"dev": {"sq": np.array([sq], np.float32)}}, model={})


class ExploreClient(ClientPlugin):
    name = "explore"

    def takes_part(self, phase):
        return True

    def begin(self, run, downlink, state):
        return _Round(run.phase)


@pytest.fixture
def explore(monkeypatch):
    def with_explore(scn, fed):
        algs = build(scn, fed)
        server = algs.server
        server.plugins.append(ExploreServer())
        return Algorithms(server, algs.client_plugins)

    monkeypatch.setattr(runner, "build", with_explore)
    monkeypatch.setattr(handler, "client_plugins", lambda scn, fed: [ExploreClient()])
    handler._PLUGINS.clear()
    CALLS.clear()
    yield
    handler._PLUGINS.clear()


def test_round_zero_runs_once_before_round_one_and_shifts_nothing(tmp_path, tiny_yaml, explore, monkeypatch):
    text = tiny_yaml + "engine: {kind: inprocess}\noutput: {checkpoint_every: 1}\n"
    run_scenario(parse_scenario(text), tmp_path / "x", progress="none")
    rows = read_metrics(tmp_path / "x")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["clients"] == 3 and rows[0]["explored"] == 3 and CALLS == [(0, 0), (0, 2), (0, 4)]
    assert (tmp_path / "x" / "checkpoints" / "round-00000.safetensors").exists()

    monkeypatch.undo()                                   # the same scenario without the stage
    handler._PLUGINS.clear()
    run_scenario(parse_scenario(text), tmp_path / "plain", progress="none")
    a, b = load_file(str(tmp_path / "x/model.safetensors")), load_file(str(tmp_path / "plain/model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_does_not_run_the_stage_again(tmp_path, tiny_yaml, explore):
    text = tiny_yaml + "engine: {kind: inprocess}\noutput: {checkpoint_every: 1}\n"
    run_scenario(parse_scenario(text.replace("rounds: 3", "rounds: 1")), tmp_path / "r", progress="none")
    assert len(CALLS) == 3
    run_scenario(parse_scenario(text), tmp_path / "r", progress="none", resume=True)
    assert len(CALLS) == 3 and [r["round"] for r in read_metrics(tmp_path / "r")] == [0, 1, 2, 3]


class Ledger(ClientPlugin):
    """Counts the rounds a client trained in, like a privacy ledger: it must never roll back."""

    name = "ledger"
    stateful = True
    keep_on_resume = frozenset({"rounds"})

    def begin(self, run, downlink, state):
        count = (state or {}).get("rounds", 0)

        class Count(ClientRound):
            def finish(self, run, model):
                return ClientResult(state={"rounds": count + 1})
        return Count()


class CrashAt5(Exception):
    pass


def test_ledger_state_is_not_rolled_back_by_resume(tmp_path, tiny_yaml, monkeypatch):
    """Crash after round 4 with the last checkpoint at round 3: on resume the SCAFFOLD-like state
    goes back to round 3, but a keep_on_resume plugin's count still includes round 4 (steps taken
    after a checkpoint were spent). Catches a resume that rolls every client state back."""
    from clients.app import app as client_app
    from fedsim.engine.inprocess import InProcessGrid, run_server_app
    from fedsim.federation import get_federation
    from fedsim.flower.codec import load_client_state, make_run_config
    from fedsim.flower.state_store import load_state
    from server.app import app as server_app

    monkeypatch.setattr(handler, "client_plugins", lambda scn, fed: [Ledger()])
    monkeypatch.setattr(runner, "build", lambda scn, fed: Algorithms(build(scn, fed).server, [Ledger()]))
    handler._PLUGINS.clear()
    text = tiny_yaml.replace("rounds: 3", "rounds: 6") + "engine: {kind: inprocess}\noutput: {checkpoint_every: 3}\n"
    scn = parse_scenario(text)
    fed = get_federation(scn)
    run_scenario(scn, tmp_path / "straight", progress="none")

    class Crashing(InProcessGrid):
        def _deliver(self, msgs, timeout):
            if int(msgs[0].content["config"]["server-round"]) == 5:
                raise CrashAt5()
            return super()._deliver(msgs, timeout)

    cut = tmp_path / "cut"
    config = make_run_config(scn, cut, "none")
    with pytest.raises(CrashAt5):
        run_server_app(server_app, Crashing(client_app, fed.num_clients, config, state_dir=cut / "client_state"), config)
    run_scenario(scn, cut, progress="none", resume=True)
    handler._PLUGINS.clear()

    def count(run_dir, cid):
        state = load_client_state(load_state(run_dir / "client_state", 1000 + cid), cid, "ledger")
        return state["rounds"] if state else 0
    in_round_4 = set(fed.sample_clients(4))
    for cid in range(fed.num_clients):
        assert count(cut, cid) == count(tmp_path / "straight", cid) + (cid in in_round_4), cid


def test_resume_on_flower_refuses_when_clients_keep_state(tmp_path, tiny_yaml):
    """Client state lives in the SuperNodes there: resuming SCAFFOLD would restart every c_i at 0."""
    from fedsim.errors import ResumeError

    loop = runner.ServerLoop(parse_scenario(tiny_yaml + "strategy: {name: scaffold}\nengine: {kind: flower}\n"),
                             tmp_path, "none", resume=True)
    with pytest.raises(ResumeError, match=r"keeps client state in the SuperNodes, so \['scaffold'\]"):
        loop._check_client_state_resumes()
    forced = runner.ServerLoop(loop.scn, tmp_path, "none", resume=True, force=True)
    forced._check_client_state_resumes()
    assert any("--force" in n for n in forced.notes)
    runner.ServerLoop(parse_scenario(tiny_yaml + "engine: {kind: flower}\n"), tmp_path, "none",
                      resume=True)._check_client_state_resumes()          # stateless clients: fine
