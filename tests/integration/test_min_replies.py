"""``federation.min_replies`` / ``retries`` / ``on_too_few_replies`` through the real server loop
(in-process engine; the worker engine's version, with processes killed by PID, is in
``test_workers.py`` and ``test_fault_tolerance.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.app import app as client_app
from fedsim.engine.inprocess import InProcessGrid, run_server_app
from fedsim.errors import RunError
from fedsim.federation import get_federation
from fedsim.flower.codec import make_run_config
from fedsim.flower.compat import NODE_UNAVAILABLE, Error, Message
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario
from server.app import app as server_app

pytestmark = pytest.mark.integration


class LosingGrid(InProcessGrid):
    """Client ``lose`` trains in round ``lose_round`` (every attempt), but its reply is lost on the
    way back: the runtime answers NODE_UNAVAILABLE instead, as for a node that went away."""

    lose, lose_round = 1, 2

    def _handle(self, msg: Message) -> Message:
        reply = super()._handle(msg)
        cfg = msg.content["config"]
        if int(cfg["server-round"]) == self.lose_round and int(cfg["client-id"]) == self.lose:
            return Message(Error(code=NODE_UNAVAILABLE, reason="the node went away"), reply_to=msg)
        return reply


def _run(out: Path, tiny_yaml: str, grid_cls=LosingGrid, **federation) -> list[dict]:
    scn = parse_scenario(tiny_yaml, overrides=[f"federation.{k}={json.dumps(v)}" for k, v in federation.items()]
                         + ["engine.kind=inprocess"])
    run_config = make_run_config(scn, out, "none")
    grid_cls.lose = get_federation(scn).sample_clients(grid_cls.lose_round)[0]
    grid = grid_cls(client_app, get_federation(scn).num_clients, run_config, state_dir=out / "client_state")
    run_server_app(server_app, grid, run_config)
    return read_metrics(out)


def test_too_few_replies_skip_the_round_and_leave_the_model(tmp_path, tiny_yaml):
    """min_replies = the whole cohort, one reply lost on every attempt: round 2 is retried once,
    then skipped — the model is not stepped (its evaluation equals round 1's) and round 3 trains
    again. Catches a min_replies that is ignored (round 2 aggregated from 2 replies), a skipped
    round that still steps the model, and a retry that is never made."""
    rows = _run(tmp_path, tiny_yaml, min_replies=1.0)
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    assert rows[1]["skip_reason"] == ("2 of 3 replies accepted, fewer than federation.min_replies (3): the round "
                                      "is not aggregated")
    assert rows[1]["events"][0].startswith("1 client(s) [") and "(the node went away): sent the round again " \
        "(retry 1 of 1)" in rows[1]["events"][0]
    assert rows[1]["rejected_by_reason"] == {"client_error": 1}          # the last attempt's answer, once
    assert (rows[1]["eval_loss"], rows[1]["eval_accuracy"]) == (rows[0]["eval_loss"], rows[0]["eval_accuracy"])
    assert rows[2]["eval_loss"] != rows[1]["eval_loss"] and rows[2]["clients"] == 3
    print(f"rounds completed: {len(rows)}, skipped: {[r['round'] for r in rows if r.get('skipped')]}")


def test_enough_replies_aggregate_what_came(tmp_path, tiny_yaml):
    """min_replies 2 of 3 with no retries: round 2 aggregates the 2 replies (the model moves)."""
    rows = _run(tmp_path, tiny_yaml, min_replies=2, retries=0)
    assert not any(r.get("skipped") for r in rows) and "events" not in rows[1]
    assert rows[1]["clients"] == 2 and rows[1]["rejected"] == 1
    assert rows[1]["eval_loss"] != rows[0]["eval_loss"]


def test_too_few_replies_stop_ends_the_run_with_the_reason(tmp_path, tiny_yaml):
    """on_too_few_replies: stop — the run ends at round 2 with an error that says why and where the
    details are; the round's row is written, no summary is (a resumable, unfinished run)."""
    with pytest.raises(RunError, match=r"round 2: 2 of 3 replies accepted, fewer than federation.min_replies \(3\).*"
                                       r"on_too_few_replies is 'stop'.*metrics.jsonl"):
        _run(tmp_path, tiny_yaml, min_replies=3, on_too_few_replies="stop", retries=0)
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "summary.json").exists()


def test_a_skipped_round_still_accounts_the_privacy_its_replies_spent(tmp_path, tiny_yaml):
    """Sample-level DP: the two clients whose replies came in the skipped round trained on their
    data and released the replies, so the server's ledgers must count those steps exactly as
    when the round is aggregated. Catches a skip that drops the accounting (ε under-reported)."""
    dp = tiny_yaml + "privacy: {noise_multiplier: 1.0, clip: 1.0}\n"
    dp = dp.replace("rounds: 3", "rounds: 2")
    _run(tmp_path / "skipped", dp, min_replies=3, retries=0)
    _run(tmp_path / "kept", dp, min_replies=1, retries=0)
    skipped, kept = (json.loads((tmp_path / d / "privacy.json").read_text())["clients"] for d in ("skipped", "kept"))
    assert read_metrics(tmp_path / "skipped")[1]["skipped"] is True
    assert skipped == kept and len(kept) >= 3


def test_replies_the_norm_guard_refuses_still_count_for_privacy(tmp_path, tiny_yaml):
    """Sample-level DP with a norm guard so tight that it refuses every reply: no round is
    aggregated, but each refused reply was trained and released, so privacy.json must equal that
    of a run without the guard. Catches a screen that hides refused replies from the ledger
    (ε under-reported, and never caught up for a client that is always refused)."""
    from fedsim.engine import run_scenario

    dp = tiny_yaml.replace("rounds: 3", "rounds: 2") + "privacy: {noise_multiplier: 1.0, clip: 1.0}\n" \
        "engine: {kind: inprocess}\n"
    guarded = dp.replace("federation:", "strategy: {name: fedavg, max_update_norm: 1.0e-9}\nfederation:")
    with pytest.raises(RunError, match="no client reply was accepted in any round"):   # said, after the files
        run_scenario(parse_scenario(guarded), tmp_path / "guarded", progress="none")
    run_scenario(parse_scenario(dp), tmp_path / "open", progress="none")
    rows = read_metrics(tmp_path / "guarded")
    assert all(r["skipped"] and r["rejected_by_reason"] == {"update_norm": 3} for r in rows)
    guarded_eps, open_eps = (json.loads((tmp_path / d / "privacy.json").read_text())["clients"]
                             for d in ("guarded", "open"))
    assert guarded_eps == open_eps and len(open_eps) >= 3
