"""The client contract's guard on private state (fedsim.core.client.check_private), also through
the real client handler."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.core.client import ClientPlugin, ClientResult, PrivateDataError, check_private


class Dice(ClientPlugin):
    name = "dice"
    private = frozenset({"error"})


def test_private_state_bytes_anywhere_in_the_reply_are_refused():
    """Catches an error buffer leaked under another name, in a group or as the model upload."""
    e = np.linspace(1, 2, 6, dtype=np.float32).reshape(2, 3)
    for result in (ClientResult(arrays={"up": {"w": e.copy()}}), ClientResult(model={"w": e.copy()})):
        with pytest.raises(PrivateDataError, match="private state 'error'"):
            check_private(Dice(), {"error": e, "public": np.zeros(2)}, result)


def test_private_names_are_refused_and_other_data_passes():
    e = np.ones(3, np.float32)
    with pytest.raises(PrivateDataError, match="named after its private state"):
        check_private(Dice(), {"error": e}, ClientResult(metrics={"error": 1.0}))
    check_private(Dice(), {"error": e}, ClientResult(arrays={"up": {"w": 2 * e}}, metrics={"steps": 3}))
    check_private(Dice(), {"error": np.zeros(3)}, ClientResult(arrays={"up": {"w": np.zeros(3)}}))  # zeros carry nothing


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
