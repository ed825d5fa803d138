"""The client contract's guard on private state (fedsim.core.client.check_private), also through
the real client handler."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.core.client import ClientPlugin, ClientResult, PrivateDataError, check_private


class Dice(ClientPlugin):
    name = "dice"
    private = frozenset({"error"})


def test_private_state_anywhere_in_the_reply_is_refused():
    """Catches an error buffer leaked under another name, in any group, cast to float32, reshaped,
    held as a dict of named tensors, or only alive during the round."""
    e = np.linspace(1, 2, 6, dtype=np.float64).reshape(2, 3)
    leaks = [{"dice.up/w": e.copy()}, {"arrays/w": e.astype(np.float32)}, {"other.g/x": e.ravel().copy()}]
    for outgoing in leaks:
        with pytest.raises(PrivateDataError, match="private state 'error"):
            check_private(Dice(), {"error": e, "public": np.zeros(2)}, {}, outgoing, [])
        with pytest.raises(PrivateDataError, match="private state 'error/w'"):
            check_private(Dice(), {"error": {"w": e}}, {}, outgoing, [])
        with pytest.raises(PrivateDataError, match="private round 'buffer'"):
            check_private(Dice(), None, {"buffer": e}, outgoing, [])


def test_private_names_are_refused_and_other_data_passes():
    e = np.ones(3, np.float32)
    with pytest.raises(PrivateDataError, match="named after its private data 'error'"):
        check_private(Dice(), {"error": e}, {}, {}, ["error"])
    check_private(Dice(), {"error": e}, {}, {"dice.up/w": 2 * e}, ["steps"])
    check_private(Dice(), {"error": np.zeros(3)}, {}, {"dice.up/w": np.zeros(3)}, [])      # zeros carry nothing


def test_the_client_handler_refuses_to_send_private_state(tmp_path, tiny_yaml, monkeypatch):
    """A plugin that puts its private buffer into the reply makes the client fail, not leak."""
    from fedsim.core.client import ClientRound

    class Leaky(ClientRound):
        def finish(self, run, model):
            secret = np.arange(1, 5, dtype=np.float32)
            return ClientResult(arrays={"out": {"x": secret}}, state={"error": secret})

    class LeakyPlugin(Dice):
        def begin(self, run, downlink, state):
            return Leaky()

    import fedsim.flower.client as handler
    from fedsim.engine import run_scenario
    from fedsim.results import read_metrics
    from fedsim.scenario import parse_scenario

    monkeypatch.setattr(handler, "client_plugins", lambda scn, fed: [LeakyPlugin()])
    handler._PLUGINS.clear()
    try:
        from fedsim.errors import RunError
        with pytest.raises(RunError, match="no client reply was accepted"):
            run_scenario(parse_scenario(tiny_yaml.replace("rounds: 3", "rounds: 1") + "engine: {kind: inprocess}\n"),
                         tmp_path / "r", progress="none")
    finally:
        handler._PLUGINS.clear()
    reasons = read_metrics(tmp_path / "r")[0]["rejected_reasons"]
    assert all("PrivateDataError" in r and "private state 'error'" in r for r in reasons)


def test_a_claimed_phase_end_to_end_through_the_real_client_handler(tmp_path, tiny_yaml, monkeypatch):
    """A phase with its own client procedure and no model upload: the handler runs the plugin's
    procedure instead of the loop, sends only the plugin's group, and the strategy accepts it
    (catches a handler that always uploads the model, or always runs the standard loop)."""
    import torch
    from flwr.app import ConfigRecord

    import fedsim.flower.client as handler
    from clients.app import app as client_app
    from fedsim.core import ArraySpec, ClientRound, PluginUpdate, Server, ServerPlugin, identity
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.federation import get_federation
    from fedsim.flower.codec import make_run_config, to_record
    from fedsim.flower.compat import set_server_identity
    from fedsim.flower.strategy import FedsimStrategy
    from fedsim.scenario import parse_scenario

    class ExploreServer(ServerPlugin):
        name = "explore"

        def phase(self, state, server_round):
            return "explore" if server_round == 1 else None

        def uplink(self, state, server_round, phase, specs):
            return specs, ({"dev": {"n": ArraySpec((1,), np.dtype(np.float32))}} if phase == "explore" else {})

        def aggregate(self, state, result):
            return PluginUpdate(sorted(float(r.groups["explore"]["dev"]["n"][0]) for r in result.replies)
                                if result.phase == "explore" else state)

    class ExploreRound(ClientRound):
        def __init__(self, phase):
            self.phase = phase

        def procedure(self, run, rounds):
            if self.phase != "explore":
                return None
            with torch.no_grad():
                next(iter(run.trainable().values())).add_(1.0)     # would show if the model went up
            return {"train_loss": 0.0, "steps": 0, "compute_s": 0.0}

        def finish(self, run, model):
            if self.phase != "explore":
                return ClientResult()
            return ClientResult(arrays={"dev": {"n": np.array([run.client_id], np.float32)}}, model={})

    class ExploreClient(ClientPlugin):
        name = "explore"

        def takes_part(self, phase):
            return True

        def begin(self, run, downlink, state):
            return ExploreRound(run.phase)

    monkeypatch.setattr(handler, "client_plugins", lambda scn, fed: [ExploreClient()])
    handler._PLUGINS.clear()
    try:
        set_server_identity(1)
        scn = parse_scenario(tiny_yaml)
        fed = get_federation(scn)
        strategy = FedsimStrategy(fed, Server(identity(), [ExploreServer()], client_lr=0.1))
        grid = InProcessGrid(client_app, fed.num_clients, make_run_config(scn, tmp_path, "none"))
        x = fed.initial_arrays()
        replies = grid.send_and_receive(strategy.configure_train(1, to_record(x), ConfigRecord(), grid))
        assert all("arrays" not in r.content for r in replies)
        outcome = strategy.aggregate(1, replies)
        assert outcome.rejected == [] and outcome.arrays is not None
        assert all(np.array_equal(outcome.arrays[k], x[k]) for k in x)          # the phase kept the model
        assert strategy.state["plugins"]["explore"] == [float(c) for c in fed.sample_clients(1)]
        replies = grid.send_and_receive(strategy.configure_train(2, to_record(x), ConfigRecord(), grid))
        assert all("arrays" in r.content for r in replies) and strategy.aggregate(2, replies).rejected == []
    finally:
        handler._PLUGINS.clear()
