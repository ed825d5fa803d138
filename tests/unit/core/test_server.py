"""The server contract (fedsim.core.server) with toy plugins: phases, downlink/uplink namespacing,
sparse replies through the real reply check, basis ids, and rounds without replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedsim.core import ArraySpec, ClientUpdate, Payload, PluginUpdate, Server, ServerPlugin, identity, scale
from fedsim.flower.codec import to_record
from fedsim.flower.compat import set_server_identity
from fedsim.flower.replies import Accepted, Expectation, Rejected, check_reply

X = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
MASK = np.array([[True, False], [False, True]])


class Masker(ServerPlugin):
    """Only the kept entries of ``w`` travel up; every round re-masks and (from round 2) bumps the basis."""

    name = "masker"

    def init(self, params):
        return {"mask": MASK.copy(), "mask_id": 1}

    def downlink(self, state, server_round):
        return Payload({"mask": {"w": state["mask"]}}, {"mask_id": state["mask_id"]})

    def uplink(self, state, server_round, phase, model_specs):
        w = model_specs["w"]
        return {**model_specs, "w": ArraySpec(w.shape, w.dtype, kept=state["mask"])}, \
            {"scores": {"w": ArraySpec((2, 2), np.dtype(np.float32))}}

    def aggregate(self, state, result):
        params = {**result.params, "w": np.where(state["mask"], result.params["w"], 0).astype(np.float32)}
        return PluginUpdate({**state, "mask_id": state["mask_id"] + 1}, params, basis_changed=result.server_round > 1)


class Explorer(ServerPlugin):
    """Claims round 1 as its own phase: no model upload, one array group; the model stays unchanged."""

    name = "explorer"

    def phase(self, state, server_round):
        return "explore" if server_round == 1 else None

    def uplink(self, state, server_round, phase, model_specs):
        return (model_specs, {"dev": {"w": ArraySpec((2, 2), np.dtype(np.float32))}}) if phase == "explore" \
            else (model_specs, {})

    def aggregate(self, state, result):
        if result.phase != "explore":
            return PluginUpdate(state)
        assert result.delta is None and result.params is result.params_before
        return PluginUpdate(np.mean([r.groups[self.name]["dev"]["w"] for r in result.replies], axis=0))


def test_plan_namespaces_plugin_scalars_and_arrays_and_states_the_reply():
    server = Server(scale(1.0), [Masker()], client_lr=0.5)
    state = server.init(X)
    plan = server.plan(state, 1, X)
    assert plan.scalars == {"phase": "train", "lr": 0.5, "basis-id": 0, "masker.mask_id": 1}
    assert list(plan.arrays) == ["masker.mask"] and plan.plugin_of == {"masker.scores": ("masker", "scores")}
    assert plan.model_spec["w"].wire_shape == (2,) and plan.model_spec["b"].wire_shape == (2,)


def _reply(msg_to: Message, cid: int, records: dict) -> Message:
    metrics = MetricRecord({"client-id": cid, "server-round": 1, "num-examples": 5, "train_loss": 0.1,
                            "compute_s": 0.1, "lr_local": 0.5})
    return Message(RecordDict({**records, "metrics": metrics}), reply_to=msg_to)


def _to(cid: int) -> Message:
    set_server_identity(1)
    return Message(RecordDict(), dst_node_id=1000 + cid, message_type="train")


def _expect(plan, n=2) -> Expectation:
    return Expectation(1, {c: 1000 + c for c in range(n)}, {c: 5 for c in range(n)}, 1 << 20, plan.model_spec,
                       plan.group_specs, plan.plugin_of, ("train_loss",))


def test_sparse_reply_is_checked_against_the_mask_and_decoded_dense():
    """A kept-only upload passes, is scattered back to dense; a dense upload of a sparse array fails."""
    server = Server(identity(), [Masker()])
    plan = server.plan(server.init(X), 1, X)
    exp = _expect(plan)
    good = _reply(_to(0), 0, {"arrays": to_record({"w": np.array([1.0, 4.0], np.float32), "b": np.ones(2, np.float32)}),
                              "masker.scores": to_record({"w": np.ones((2, 2), np.float32)})})
    ok = check_reply(good, exp)
    assert isinstance(ok, Accepted)
    assert ok.model["w"].tolist() == [[1.0, 0.0], [0.0, 4.0]] and ok.groups["masker"]["scores"]["w"].shape == (2, 2)
    dense = _reply(_to(1), 1, {"arrays": to_record({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}),
                               "masker.scores": to_record({"w": np.ones((2, 2), np.float32)})})
    bad = check_reply(dense, exp)
    assert isinstance(bad, Rejected) and "expected float32[2]" in bad.reason


def test_missing_or_unexpected_plugin_records_are_rejected():
    server = Server(identity(), [Masker()])
    plan = server.plan(server.init(X), 1, X)
    model = to_record({"w": np.ones(2, np.float32), "b": np.ones(2, np.float32)})
    no_group = check_reply(_reply(_to(0), 0, {"arrays": model}), _expect(plan))
    assert isinstance(no_group, Rejected) and "no 'masker.scores' record" in no_group.reason
    extra = check_reply(_reply(_to(1), 1, {"arrays": model, "masker.scores": to_record({"w": np.ones((2, 2), np.float32)}),
                                           "leak": to_record({"e": np.ones(3, np.float32)})}), _expect(plan))
    assert isinstance(extra, Rejected) and "unexpected array records ['leak']" in extra.reason


def test_aggregate_lets_plugins_replace_params_and_bump_the_basis():
    server = Server(identity(), [Masker()])
    state = server.init(X)
    for rnd in (1, 2):
        plan = server.plan(state, rnd, X)
        replies = [ClientUpdate(0, 1.0, {"w": np.full((2, 2), 3, np.float32), "b": np.ones(2, np.float32)},
                                {"masker": {"scores": {"w": np.zeros((2, 2), np.float32)}}})]
        params, state, _ = server.aggregate(state, plan, X, replies)
        assert params["w"].tolist() == [[3.0, 0.0], [0.0, 3.0]] and params["b"].tolist() == [1.0, 1.0]
    assert state["basis_id"] == 1 and state["plugins"]["masker"]["mask_id"] == 3
    assert server.plan(state, 3, X).scalars["basis-id"] == 1


def test_a_claimed_phase_skips_the_optimizer_and_the_model_upload():
    server = Server(scale(2.0), [Explorer()])
    state = server.init(X)
    plan = server.plan(state, 1, X)
    assert plan.phase == "explore" and plan.model_spec == {} and plan.scalars["phase"] == "explore"
    replies = [ClientUpdate(c, 1.0, {}, {"explorer": {"dev": {"w": np.full((2, 2), c, np.float32)}}}) for c in (1, 3)]
    params, state, _ = server.aggregate(state, plan, X, replies)
    assert params is X and state["plugins"]["explorer"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert server.plan(state, 2, X).phase == "train"


def test_two_plugins_claiming_a_round_is_an_error():
    class Greedy(Explorer):
        name = "greedy"
    server = Server(identity(), [Explorer(), Greedy()])
    with pytest.raises(ValueError, match="claimed by several plugins"):
        server.plan(server.init(X), 1, X)


def test_a_round_without_replies_changes_nothing():
    server = Server(scale(1.0), [Masker()])
    state = server.init(X)
    plan = server.plan(state, 1, X)
    params, new_state, metrics = server.aggregate(state, plan, X, [])
    assert params is X and new_state is state and metrics == {"lr_global": 1.0}


def test_plugin_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        Server(identity(), [Masker(), Masker()])


class Picky(Explorer):
    name = "picky"

    def sample(self, state, server_round):
        return [3, 1]


def test_the_phase_owner_chooses_who_takes_part_through_the_strategy(tiny_yaml):
    """Catches a strategy that ignores the phase owner's cohort (explorers) and samples as usual."""
    from flwr.app import ConfigRecord

    from fedsim.federation import get_federation
    from fedsim.flower.strategy import FedsimStrategy
    from fedsim.scenario import parse_scenario

    class Nodes:
        def get_node_ids(self):
            return [1000 + c for c in range(6)]

    set_server_identity(1)
    fed = get_federation(parse_scenario(tiny_yaml))
    strategy = FedsimStrategy(fed, Server(identity(), [Picky()]))
    msgs = strategy.configure_train(1, to_record(fed.initial_arrays()), ConfigRecord(), Nodes())
    assert [m.content["config"]["client-id"] for m in msgs] == [1, 3]
    assert all(m.content["config"]["phase"] == "explore" for m in msgs)
    msgs = strategy.configure_train(2, to_record(fed.initial_arrays()), ConfigRecord(), Nodes())
    assert [m.content["config"]["client-id"] for m in msgs] == fed.sample_clients(2)


class Pruner(ServerPlugin):
    """Keeps entry (0, 1) of ``w`` at exactly 0; sends its mask only to clients that have not seen it."""

    name = "pruner"

    def init(self, params):
        return {"seen": []}

    def mask(self, state):
        return {"w": np.array([[True, False], [True, True]])}

    def downlink_client(self, state, server_round, cid):
        return Payload({"mask": {"w": self.mask(state)["w"]}}) if cid not in state["seen"] else Payload()

    def aggregate(self, state, result):
        return PluginUpdate({"seen": sorted(set(state["seen"]) | {r.cid for r in result.replies})})


def test_mask_keeps_pruned_entries_and_momentum_at_zero():
    """Catches a server step (or FedAvgM's buffer) that revives pruned entries (AutoFLIP's A5)."""
    from fedsim.algorithms.optimizers import fedavgm

    server = Server(fedavgm(1.0, 0.9), [Pruner()])
    state = server.init(X)
    x = X
    for rnd in (1, 2):
        plan = server.plan(state, rnd, x)
        replies = [ClientUpdate(0, 1.0, {"w": np.full((2, 2), 5, np.float32), "b": np.ones(2, np.float32)})]
        x, state, _ = server.aggregate(state, plan, x, replies)
        assert x["w"][0, 1] == 0.0 and x["w"][0, 0] != 0.0
        assert state["optimizer"][0]["w"][0, 1] == 0.0 and state["optimizer"][0]["w"][0, 0] != 0.0
    from fedsim.core import Transform

    drift = Transform(lambda p: None, lambda u, s, p, i: ({k: v + 1.0 for k, v in u.items()}, s))   # not linear
    server = Server(drift, [Pruner()])
    state = server.init(X)
    x, _, _ = server.aggregate(state, server.plan(state, 1, X), X, [ClientUpdate(0, 1.0, dict(X))])
    assert x["w"].tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_per_client_downlink_and_non_participants_of_a_phase():
    """downlink_client reaches only its client; a plugin that does not take part in a claimed phase
    contributes nothing to that round (catches SCAFFOLD expecting delta_c from explorers)."""
    server = Server(identity(), [Explorer(), Pruner()])
    state = server.init(X)
    plan = server.plan(state, 1, X)                 # explore: the pruner does not take part
    assert plan.plugins == ["explorer"] and server.client_downlink(state, plan, 0).arrays == {}
    plan = server.plan(state, 2, X)
    assert plan.plugins == ["explorer", "pruner"]
    assert list(server.client_downlink(state, plan, 0).arrays) == ["pruner.mask"]
    _, state, _ = server.aggregate(state, plan, X, [ClientUpdate(0, 1.0, dict(X))])
    assert server.client_downlink(state, server.plan(state, 3, X), 0).arrays == {}      # seen: not sent again
    assert list(server.client_downlink(state, server.plan(state, 3, X), 1).arrays) == ["pruner.mask"]


def test_a_round_zero_claim_runs_before_round_one():
    class Before(Explorer):
        def phase(self, state, server_round):
            return "explore" if server_round == 0 else None

    server = Server(identity(), [Before()])
    assert server.first_round(server.init(X)) == 0 and Server(identity(), [Explorer()]).first_round({"plugins": {
        "explorer": None}}) == 1
