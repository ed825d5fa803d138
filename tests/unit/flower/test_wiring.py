"""The seam's wiring, through the real entry points: the strategy builds real messages, the real
ClientApp (``clients.app``) trains on them in an in-process grid, the strategy aggregates the
real replies. Each test names the deliberate bug it catches."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.app import app as client_app
from fedsim.builder import build
from fedsim.engine.inprocess import InProcessGrid
from fedsim.federation import get_federation
from fedsim.flower.codec import MODEL_RECORD, from_record, make_run_config, to_record
from fedsim.flower.compat import set_server_identity
from fedsim.flower.strategy import FedsimStrategy
from fedsim.scenario import parse_scenario


class Round:
    """One federation driven by hand: configure a round, deliver, aggregate."""

    def __init__(self, text: str, tmp_path):
        set_server_identity(1)
        self.scn = parse_scenario(text)
        self.fed = get_federation(self.scn)
        self.strategy = FedsimStrategy(self.fed, build(self.scn, self.fed).server)
        self.grid = InProcessGrid(client_app, self.fed.num_clients, make_run_config(self.scn, tmp_path, "none"),
                                  state_dir=tmp_path / "client_state")
        self.params = self.fed.initial_arrays()

    def messages(self, rnd: int) -> list[Message]:
        return self.strategy.configure_train(rnd, to_record(self.params), ConfigRecord(), self.grid)

    def deliver(self, msgs: list[Message]) -> list[Message]:
        return self.grid.send_and_receive(msgs)

    def step(self, rnd: int):
        outcome = self.strategy.aggregate(rnd, self.deliver(self.messages(rnd)))
        self.params = outcome.arrays if outcome.arrays is not None else self.params
        return outcome


def _dist(x: dict, w: dict) -> float:
    return float(np.sqrt(sum(np.sum((w[k].astype(np.float64) - x[k]) ** 2) for k in x)))


def test_fedprox_pulls_local_models_toward_the_global_model(tmp_path, tiny_yaml):
    """Catches the proximal term with its sign flipped (it would push the models away instead)."""
    text = tiny_yaml.replace("steps: 3", "steps: 12")
    plain = Round(text, tmp_path / "avg")
    prox = Round(text + "strategy: {name: fedprox, proximal_mu: 10.0}\n", tmp_path / "prox")
    x = plain.params
    far = [_dist(x, from_record(r.content[MODEL_RECORD])) for r in plain.deliver(plain.messages(1))]
    near = [_dist(x, from_record(r.content[MODEL_RECORD])) for r in prox.deliver(prox.messages(1))]
    assert all(n < 0.5 * f for n, f in zip(near, far)), (near, far)


def test_uniform_weighting_averages_every_reply_equally(tmp_path, tiny_yaml):
    """Catches ``lr_schedule.weighting: uniform`` being ignored (example-weighted mean instead)."""
    text = tiny_yaml + "lr_schedule: {kind: fedhyper, variant: g, weighting: uniform}\n"
    r = Round(text, tmp_path)
    replies = r.deliver(r.messages(1))
    outcome = r.strategy.aggregate(1, replies)
    clients = [from_record(m.content[MODEL_RECORD]) for m in replies]
    sizes = np.array([m.content["metrics"]["num-examples"] for m in replies], np.float64)
    assert len(set(sizes)) > 1                                     # the test needs unequal clients
    for k, x in r.params.items():
        uniform = x + np.mean([c[k].astype(np.float64) - x for c in clients], axis=0)
        weighted = x + sum(s / sizes.sum() * (c[k].astype(np.float64) - x) for s, c in zip(sizes, clients))
        np.testing.assert_allclose(outcome.arrays[k], uniform.astype(np.float32), rtol=0, atol=1e-6)
        assert not np.allclose(uniform, weighted, rtol=0, atol=1e-5) or k.endswith("bias")


def test_duplicate_reply_is_rejected_and_not_counted_twice(tmp_path, tiny_yaml):
    """Catches a removed duplicate-reply guard (the duplicate would be averaged in a second time)."""
    a, b = Round(tiny_yaml, tmp_path / "a"), Round(tiny_yaml, tmp_path / "b")
    honest = a.step(1)
    replies = b.deliver(b.messages(1))
    doubled = b.strategy.aggregate(1, replies + [replies[0]])
    cid = replies[0].content["metrics"]["client-id"]
    assert doubled.rejected == [(cid, f"duplicate reply for client {cid}", "duplicate")]
    assert doubled.metrics["clients"] == honest.metrics["clients"] == 3
    assert all(np.array_equal(honest.arrays[k], doubled.arrays[k]) for k in honest.arrays)


def test_reply_arrival_order_does_not_change_the_aggregate(tmp_path, tiny_yaml):
    """Catches aggregation in arrival order (float64 sums in another order differ in the last bits)."""
    text = tiny_yaml.replace("clients_per_round: 3", "clients_per_round: 6")
    a, b = Round(text, tmp_path / "a"), Round(text, tmp_path / "b")
    replies_a, replies_b = a.deliver(a.messages(1)), b.deliver(b.messages(1))
    ordered = a.strategy.aggregate(1, replies_a)
    shuffled = b.strategy.aggregate(1, [replies_b[i] for i in (4, 1, 5, 0, 3, 2)])
    assert all(np.array_equal(ordered.arrays[k], shuffled.arrays[k]) for k in ordered.arrays)
    assert [c["client_id"] for c in shuffled.clients] == sorted(c["client_id"] for c in shuffled.clients)


def _flip(msg: Message, record: str) -> Message:
    """The same message with the arrays of one record negated."""
    content = RecordDict({k: v for k, v in msg.content.items()})
    content[record] = ArrayRecord({k: v for k, v in to_record({n: -a for n, a in from_record(msg.content[record])
                                                               .items()}).items()})
    return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)


def test_cl_uses_the_previous_global_update_it_is_sent(tmp_path, tiny_yaml):
    """Catches FedHyper-CL ignoring the Delta_{t-1} in the message (both replies would be identical)."""
    text = tiny_yaml.replace("steps: 3", "steps: 6") + \
        "lr_schedule: {kind: fedhyper, variant: cl, beta_l: 0, beta_lg: 200}\n"
    r = Round(text, tmp_path)
    r.step(1)
    msgs = r.messages(2)
    record = next(k for k in msgs[0].content.keys() if k.endswith(".prev_update"))
    same = r.deliver(msgs)
    flipped = r.deliver([_flip(m, record) for m in msgs])
    lr = [m.content["metrics"]["lr_local"] for m in same]
    lr_flipped = [m.content["metrics"]["lr_local"] for m in flipped]
    assert all(a != b for a, b in zip(lr, lr_flipped)), (lr, lr_flipped)
    assert any(a > 0.1 for a in lr) and any(a < 0.1 for a in lr_flipped)


def test_cl_skips_the_first_batch_of_every_epoch_and_metrics_reach_the_files(tmp_path, tiny_yaml):
    """Catches ``on_epoch`` never being called (the first batch of epoch 2 would update b), and
    client metrics being dropped between the reply and metrics.jsonl / clients.jsonl."""
    from fedsim.engine import run_scenario
    from fedsim.results import read_metrics

    text = tiny_yaml.replace("steps: 3, batch_size: 16", "epochs: 2, batch_size: 16") + \
        "engine: {kind: inprocess}\nlr_schedule: {kind: fedhyper, variant: g+cl}\n"
    run_scenario(parse_scenario(text), tmp_path / "run", progress="none")
    clients = read_metrics(tmp_path / "run", "clients.jsonl")
    assert len(clients) == 3 * 3 and {c["round"] for c in clients} == {1, 2, 3}
    for c in clients:
        per_epoch = -(-c["num_examples"] // 16)
        assert c["cl_steps"] == 2 * per_epoch and c["steps"] == c["cl_steps"]
        assert c["cl_updates"] + c["cl_hypergrad_skipped"] == c["cl_steps"] - 2
    rows = read_metrics(tmp_path / "run")
    for row in rows:
        mine = [c for c in clients if c["round"] == row["round"]]
        assert row["cl_b_final_mean"] == pytest.approx(np.mean([c["cl_b_final"] for c in mine]), rel=1e-12)
        assert row["cl_b_final_min"] == min(c["cl_b_final"] for c in mine)
        assert {"hypergrad_skipped", "lr_global", "steps_mean"} <= set(row)
