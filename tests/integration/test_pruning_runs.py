"""AutoFLIP and the random-mask baseline through the real engines: the FedAvg limit (A4), zeros that
stay zero through local steps, aggregation and server momentum (A5), sparse bytes on the wire and
a bitmap only when a client lacks the mask (A10), one exploration across a crash and resume (A11),
the cost counters in summary.json, and the scenario guards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from clients.app import app as client_app
from fedsim.engine import run_scenario
from fedsim.engine.inprocess import InProcessGrid, run_server_app
from fedsim.federation import get_federation
from fedsim.flower.codec import make_run_config
from fedsim.results import read_json, read_metrics
from fedsim.scenario import ScenarioError, parse_scenario
from server.app import app as server_app

BASE = """\
name: prune
seed: 5
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 6, alpha: 0.5, min_size: 20}
model: {name: mlp, options: {hidden: [32]}}
federation:
  rounds: 3
  clients_per_round: 3
  local: {epochs: 1, batch_size: 16, lr: 0.1, momentum: 0.9}
engine: {kind: inprocess}
"""
EXPLORE = "explore_epochs: 3, patience: 2, explore_batch_size: 32, explore_lr: 0.01"


def _with(extra: str):
    """BASE with the top-level sections of ``extra`` replacing BASE's (a repeated key is an error)."""
    return parse_scenario(BASE, overrides=[f"{k}={json.dumps(v)}" for k, v in (yaml.safe_load(extra) or {}).items()])


def _run(tmp_path: Path, name: str, extra: str = "", progress: str = "none", **kw) -> Path:
    run_scenario(_with(extra), tmp_path / name, progress=progress, **kw)
    return tmp_path / name


def _model(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_no_sparsity_is_fedavg_bit_for_bit(tmp_path):
    """A4: sparsity 0 and structured 0 after an exploration stage give FedAvg's model exactly.
    Catches exploration drawing from the training streams, θ¹ not being θ⁰, round numbers
    shifted by the stage, and a sparse wire that scatters values to the wrong entries."""
    fedavg = _run(tmp_path, "fedavg")
    pruned = _run(tmp_path, "pruned", f"pruning: {{sparsity: 0.0, structured_sparsity: 0.0, {EXPLORE}}}\n",
                  progress="log")                      # the log line of round 0 (no ETA to divide by yet)
    a, b = _model(fedavg), _model(pruned)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    rows = read_metrics(pruned)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    doc = read_json(pruned / "pruning.json")
    assert doc["explored"] and doc["sparsity"] == 0.0 and len(doc["exploration"]["explorers"]) == 6
    assert all(1 <= c["epochs"] <= 3 for c in doc["exploration"]["clients"].values())


@pytest.fixture(scope="module")
def autoflip(tmp_path_factory) -> Path:
    """AutoFLIP at 40 % unstructured + 25 % structured under FedAvgM (server momentum) and client momentum."""
    return _run(tmp_path_factory.mktemp("af"), "af",
                f"strategy: {{name: fedavgm, server_momentum: 0.9}}\n"
                f"pruning: {{sparsity: 0.4, structured_sparsity: 0.25, {EXPLORE}}}\n")


def test_zeros_stay_zero_and_the_mask_is_what_pruning_json_says(autoflip):
    """A5 and A9 through the engine: every masked entry of the final model is exactly 0, a removed
    hidden unit's fan-in row, bias and fan-out column included, and the exact sparsity holds.
    Catches a mask not re-applied after the step (momentum revives zeros), the server's momentum
    reviving them after aggregation, and removed units whose fan-out was left trainable."""
    doc = read_json(autoflip / "pruning.json")
    model = _model(autoflip)
    removed = doc["removed_units"]
    assert removed and all(len(v) == 8 for v in removed.values())          # floor(0.25 * 32) of the hidden layer
    units = next(iter(removed.values()))
    w1, b1, w2 = model["net.1.weight"], model["net.1.bias"], model["net.3.weight"]
    assert not w1[units].any() and not b1[units].any() and not w2[:, units].any()
    zeros = sum(int(np.count_nonzero(model[k] == 0)) for k in doc["pruned"])
    assert zeros >= sum(doc["pruned"].values())
    weights = w1.size + w2.size
    remaining = weights - 8 * 64 - 8 * 10                                    # maskable entries after the structured step
    assert doc["pruned"]["net.1.weight"] + doc["pruned"]["net.3.weight"] == 8 * 64 + 8 * 10 + int(0.4 * remaining)
    assert all(r["sparsity"] == doc["sparsity"] for r in read_metrics(autoflip) if r["round"] >= 1)


@pytest.mark.parametrize("strategy", [
    "strategy: {name: fedadam, server_lr: 0.01}\n",
    "strategy: {name: fedprox, proximal_mu: 0.1}\n",
    "strategy: {name: scaffold}\n",
    "lr_schedule: {kind: fedhyper, variant: g+cl}\n",
])
def test_the_mask_holds_under_every_strategy(tmp_path, strategy):
    """``pruning`` composes with every server strategy and client plugin: every round aggregates all
    its replies and masked entries are exactly 0 in the final model. Catches a plugin whose reply
    contract clashes with the sparse one (SCAFFOLD's control-variate group, FedHyper-CL's client
    state: replies rejected) and any path that leaves a pruned entry non-zero at the end. (Several
    guards keep zeros at 0 — sparse uploads decode to 0, the server masks the update, the client
    re-masks after each step — so removing any one of them alone does not fail this test.)"""
    run = _run(tmp_path, "s", strategy + f"pruning: {{sparsity: 0.5, {EXPLORE}}}\n")
    assert all(r["clients"] == 3 and r["rejected"] == 0 for r in read_metrics(run) if r["round"] >= 1)
    doc, model = read_json(run / "pruning.json"), _model(run)
    assert sum(int(np.count_nonzero(model[k] == 0)) for k in doc["pruned"]) >= sum(doc["pruned"].values())
    assert not model["net.1.weight"][doc["removed_units"]["net.1"]].any()


def test_cost_counters_in_summary(autoflip):
    """The summary's FLOPs and bytes ratios: below 1 where the mask saves, exploration added on top.
    Catches dense uploads (bytes_up_ratio 1), the exploration cost left out, and FLOPs counted
    on the dense model."""
    s = read_json(autoflip / "summary.json")
    doc = read_json(autoflip / "pruning.json")
    assert s["sparsity"] == doc["sparsity"] > 0.4
    assert 0 < s["flops_ratio"] < s["flops_ratio_structured"] < 1
    assert s["flops_ratio_with_exploration"] > s["flops_ratio"]
    assert s["flops_ratio"] == pytest.approx(doc["macs"]["theoretical"] / doc["macs"]["dense"])
    assert 0 < s["bytes_up_ratio"] < 1 and 0 < s["bytes_down_ratio"] < 1
    assert s["bytes_up_ratio_with_exploration"] > s["bytes_up_ratio"]


def test_sparse_bytes_on_the_wire(tmp_path, autoflip):
    """A10: a round's uplink and downlink are smaller than the same round's dense ones by the masked
    entries' 4 bytes per message (plus the bitmap down in round 1, when every client lacks it),
    within protobuf overhead (<= 1 KiB + 1 % per message); the dense-equivalent bytes match the
    dense run's. Catches kept-only arrays that are not actually sent sparse (either way), indices
    sent along, and a dense-equivalent count that is assumed rather than measured."""
    doc = read_json(autoflip / "pruning.json")
    dense = _run(tmp_path, "dense", "strategy: {name: fedavgm, server_momentum: 0.9}\n")
    pruned_entries = sum(doc["pruned"].values())
    bitmap = -(-sum(v.size for v in _model(autoflip).values()) // 8)
    for a, b in zip(read_metrics(dense), [r for r in read_metrics(autoflip) if r["round"] >= 1]):
        for way, per in (("up", 0), ("down", bitmap if b["round"] == 1 else 0)):
            expected = a[f"bytes_{way}"] - b["clients"] * (4 * pruned_entries - per)
            assert abs(b[f"bytes_{way}"] - expected) <= b["clients"] * (1024 + 0.01 * a[f"bytes_{way}"] / a["clients"])
            assert abs(b[f"bytes_{way}_dense"] - a[f"bytes_{way}"]) <= b["clients"] * (1024 + 0.01 * a[f"bytes_{way}"] / a["clients"])


def _server(pruning: str):
    """The pruning run's server on its contract (no engine): ``(fed, server, params, names, state)``."""
    from fedsim.builder import build
    from fedsim.federation import Federation

    fed = Federation(parse_scenario(BASE + f"pruning: {pruning}\n"))
    server = build(fed.scenario, fed).server
    params = fed.initial_arrays()
    return fed, server, params, fed.trainable_names(), server.init(params)


def test_bitmap_only_when_the_client_lacks_the_mask():
    """A10's second half on the server contract: the bitmap (ceil(|P_M|/8) bytes: the weights only, an
    unstructured mask never zeroes a bias) goes to a client the first time it takes part after a
    mask change, never again. Catches a bitmap in every message, and one that carries every tensor."""
    from fedsim.core.server import ClientUpdate

    fed, server, params, _, state = _server("{kind: random, sparsity: 0.5}")
    plan = server.plan(state, 1, params)
    first = server.client_downlink(state, plan, 2)
    bits = first.arrays["pruning.bitmap"]["bits"]
    n = sum(params[k].size for k in fed.trainable_names() if params[k].ndim >= 2)
    assert bits.dtype == np.uint8 and bits.size == -(-n // 8)
    reply = ClientUpdate(2, 10.0, {k: v.copy() for k, v in params.items()}, metrics={"pruning_samples": 10})
    _, state, _ = server.aggregate(state, plan, params, [reply])
    assert server.client_downlink(state, server.plan(state, 2, params), 2).arrays == {}
    assert "pruning.bitmap" in server.client_downlink(state, server.plan(state, 2, params), 3).arrays


def test_mask_refresh_rebuilds_from_the_round_updates():
    """``mask_update: every_k_rounds`` on the server contract: a refresh round asks for dense uploads,
    rebuilds the mask from the updates' squared deviations (entries that moved most are kept, a
    pruned one included: revived at 0), masks the new model, bumps mask_id and the basis id, and
    sends the new bitmap to clients that held the old one. Catches a refresh that keeps the old mask,
    reads sparse (masked) uploads so that pruned entries can never come back, or leaves the
    clients' cached mask (and DiceSGD's error basis) stale."""
    from fedsim.core.server import ClientUpdate

    fed, server, params, names, state = _server(f"{{sparsity: 0.5, structured_sparsity: 0.0, "
                                                f"mask_update: every_k_rounds, mask_update_every: 2, {EXPLORE}}}")
    rng = np.random.default_rng(0)
    plan = server.plan(state, 0, params)
    explored = [ClientUpdate(c, 10.0, {}, groups={"pruning": {"deviation": {k: rng.random(params[k].shape, np.float32)
                                                                                 for k in names}}}) for c in plan.cohort]
    params, state, _ = server.aggregate(state, plan, params, explored)
    mask = state["plugins"]["pruning"]["mask"]
    plan = server.plan(state, 1, params)
    assert plan.model_spec["net.1.weight"].kept is not None and plan.scalars["pruning.refresh"] == 0

    plan = server.plan(state, 2, params)
    assert plan.model_spec["net.1.weight"].kept is None, "a refresh round needs dense uploads"
    assert plan.scalars["pruning.refresh"] == 1
    w = "net.1.weight"
    revive = np.zeros_like(mask[w])
    revive[np.argwhere(~mask[w])[0][0], np.argwhere(~mask[w])[0][1]] = True       # one pruned entry moves a lot
    def model(c):
        out = {k: v + 1e-3 * rng.random(v.shape).astype(v.dtype) for k, v in params.items()}
        out[w] = out[w] + 10.0 * revive
        return out
    replies = [ClientUpdate(c, 10.0, model(c), metrics={"pruning_samples": 10}) for c in (0, 1, 2)]
    basis = state["basis_id"]
    new_params, state, _ = server.aggregate(state, plan, params, replies)
    ps = state["plugins"]["pruning"]
    assert ps["mask_id"] == 2 and state["basis_id"] == basis + 1
    assert ps["mask"][w][revive].all(), "the entry that moved most was not revived"
    assert new_params[w][revive].item() == 0.0, "a revived entry must start at 0"
    assert all(not new_params[k][~m].any() for k, m in ps["mask"].items())
    assert ps["refreshes"][0]["round"] == 2 and ps["refreshes"][0]["entries_changed"] >= 2
    weights = sum(m.size for m in ps["mask"].values() if m.ndim >= 2)                 # maskable: weights
    assert sum(int((~m).sum()) for m in ps["mask"].values()) == weights // 2           # exact sparsity again
    assert "pruning.bitmap" in server.client_downlink(state, server.plan(state, 3, new_params), 0).arrays


def test_start_from_explored_is_the_explorers_mean_under_the_mask():
    """``start_from: explored`` (compat) on the server contract: round 0 asks the explorers for their
    models as well as their deviations, and θ¹ is the explorers' weighted mean (n_k with
    ``explore_weighting: num_examples``) under the mask. Catches θ⁰ kept (the default's start),
    uniform weights where n_k were asked for, and a start point left unmasked."""
    from fedsim.core.server import ClientUpdate

    fed, server, params, names, state = _server(f"{{sparsity: 0.5, start_from: explored, "
                                                f"explore_weighting: num_examples, {EXPLORE}}}")
    plan = server.plan(state, 0, params)
    assert plan.scalars["pruning.send_explored"] == 1 and set(plan.model_spec) == set(params)
    rng = np.random.default_rng(1)
    models = {c: {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in params.items()} for c in plan.cohort}
    sizes = {c: 10.0 * (i + 1) for i, c in enumerate(plan.cohort)}
    replies = [ClientUpdate(c, sizes[c], models[c], groups={"pruning": {"deviation": {
        k: rng.random(params[k].shape, np.float32) for k in names}}}) for c in plan.cohort]
    start, state, _ = server.aggregate(state, plan, params, replies)
    mask = state["plugins"]["pruning"]["mask"]
    total = sum(sizes.values())
    for k in names:
        mean = sum(models[c][k].astype(np.float64) * sizes[c] / total for c in plan.cohort)
        np.testing.assert_allclose(start[k], np.where(mask.get(k, True), mean, 0.0), rtol=1e-5, atol=1e-6)


def test_start_from_explored_through_the_engine(tmp_path):
    """The compat start on the engine: the explorers' uploads carry their models (round 0 sends more
    bytes up than the default's), the run trains on the mask from there, and the model differs
    from the default start's. Catches a client that ignores ``send_explored`` (the server rejects
    its reply: no explorer replies, the run fails)."""
    extra = f"pruning: {{sparsity: 0.3, {EXPLORE}}}\n"
    a = _run(tmp_path, "initial", extra)
    b = _run(tmp_path, "explored", extra.replace("{", "{start_from: explored, ", 1))
    ra, rb = ({r["round"]: r for r in read_metrics(run)} for run in (a, b))
    n = sum(v.size for v in _model(a).values())
    explorers = ra[0]["clients"]
    assert rb[0]["clients"] == explorers and rb[0]["rejected"] == 0
    assert rb[0]["bytes_up"] - ra[0]["bytes_up"] >= 4 * n * explorers          # θ_k in fp32 on top of D_k
    assert rb[3]["clients"] == 3 and rb[3]["rejected"] == 0
    ma, mb = _model(a), _model(b)
    assert any(not np.array_equal(ma[k], mb[k]) for k in ma)


def test_mask_refresh_through_the_engine(tmp_path):
    """Refresh rounds on the engine: rounds 2 and 4 rebuild the mask (mask_id 1 -> 3), their uploads
    are dense on the wire and their FLOPs count dense; the sparsity stays exact. Catches a
    ``refresh`` scalar that the client ignores (a sparse upload the server rejects: no replies)."""
    run = _run(tmp_path, "refresh", f"federation: {{rounds: 4, clients_per_round: 3, local: {{epochs: 1, "
                                    f"batch_size: 16, lr: 0.1}}}}\n"
                                    f"pruning: {{sparsity: 0.4, mask_update: every_k_rounds, mask_update_every: 2, "
                                    f"{EXPLORE}}}\n")
    doc = read_json(run / "pruning.json")
    assert [r["round"] for r in doc["refreshes"]] == [2, 4] and doc["mask_id"] == 3
    rows = {r["round"]: r for r in read_metrics(run)}
    assert all(rows[t]["clients"] == 3 and rows[t]["rejected"] == 0 for t in (1, 2, 3, 4))
    for t in (2, 4):
        assert rows[t]["bytes_up"] == rows[t]["bytes_up_dense"]
    for t in (1, 3):
        assert rows[t]["bytes_up"] < rows[t]["bytes_up_dense"]
    s = read_json(run / "summary.json")
    masked_share = doc["macs"]["theoretical"] / doc["macs"]["dense"]
    assert masked_share < s["flops_ratio"] < 1                      # two of four rounds at dense cost
    assert [r["mask_id"] for r in read_metrics(run) if r["round"] >= 1] == [1, 2, 2, 3]


class Crash(Exception):
    """Stands for the process being killed."""


class CrashingGrid(InProcessGrid):
    crash_round = 3

    def _deliver(self, msgs, timeout):
        if int(msgs[0].content["config"]["server-round"]) == self.crash_round:
            raise Crash()
        return super()._deliver(msgs, timeout)


def test_exploration_runs_once_across_a_crash_and_resume(tmp_path, monkeypatch):
    """A11: checkpoint after round 1, crash in round 3, resume: exploration is not run again, and the
    model equals a straight run's. Catches an exploration flag outside the checkpointed state."""
    from fedsim.algorithms import autoflip as algorithm

    calls = []

    class Counted(algorithm.ExplorationSchedule):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(algorithm, "ExplorationSchedule", Counted)
    scn = parse_scenario(BASE.replace("rounds: 3", "rounds: 4") +
                         f"pruning: {{sparsity: 0.3, {EXPLORE}}}\noutput: {{checkpoint_every: 1}}\n")
    run_scenario(scn, tmp_path / "straight", progress="none")
    explorers = len(read_json(tmp_path / "straight" / "pruning.json")["exploration"]["explorers"])
    assert len(calls) == explorers
    calls.clear()

    cut = tmp_path / "cut"
    run_config = make_run_config(scn, cut, "none")
    grid = CrashingGrid(client_app, get_federation(scn).num_clients, run_config, state_dir=cut / "client_state")
    with pytest.raises(Crash):
        run_server_app(server_app, grid, run_config)
    assert len(calls) == explorers
    run_scenario(scn, cut, progress="none", resume=True)
    assert len(calls) == explorers, "exploration ran again on resume"
    a, b = _model(tmp_path / "straight"), _model(cut)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "pruning.json").read_text())["exploration"] == \
        json.loads((tmp_path / "straight" / "pruning.json").read_text())["exploration"]


def test_random_baseline_masks_from_round_one(tmp_path):
    """The random-mask baseline: exact sparsity over the maskable weights, masked entries 0 in the
    final model, no exploration stage. Catches θ⁰'s values left at masked entries on the server."""
    run = _run(tmp_path, "random", "pruning: {kind: random, sparsity: 0.5}\n")
    doc = read_json(run / "pruning.json")
    model = _model(run)
    weights = model["net.1.weight"].size + model["net.3.weight"].size
    assert doc["pruned"]["net.1.weight"] + doc["pruned"]["net.3.weight"] == weights // 2
    assert not doc["exploration"]["explorers"] and [r["round"] for r in read_metrics(run)] == [1, 2, 3]
    zeros = int(np.count_nonzero(model["net.1.weight"] == 0) + np.count_nonzero(model["net.3.weight"] == 0))
    assert zeros >= weights // 2
    s = read_json(run / "summary.json")     # unstructured: dense kernels realise nothing (was the theoretical ratio)
    assert s["flops_ratio"] < 0.6 and s["flops_ratio_structured"] == 1.0
    assert s["sparsity"] == doc["sparsity"] == (weights // 2) / weights      # over P_M, not over every parameter
    assert set(doc["pruned"]) == {"net.1.weight", "net.3.weight"}           # the bitmap's tensors: P_M


@pytest.mark.integration
def test_workers_engine_matches_inprocess(tmp_path):
    """Exploration in worker processes, masked training and a refresh round (round 2: dense training
    and upload, a new mask) give the in-process model and mask exactly. Catches worker-side state
    (the cached bitmap, the refresh flag) that differs from the in-process client's."""
    extra = f"pruning: {{sparsity: 0.3, mask_update: every_k_rounds, mask_update_every: 2, {EXPLORE}}}\n"
    a = _run(tmp_path, "a", extra)
    b = _run(tmp_path, "b", extra + "engine: {kind: workers, workers: 2}\n")
    ma, mb = _model(a), _model(b)
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    pa, pb = read_json(a / "pruning.json"), read_json(b / "pruning.json")
    assert [r["round"] for r in pb["refreshes"]] == [2] and pa["refreshes"] == pb["refreshes"]
    assert pa["digest"] == pb["digest"]


def test_dicesgd_error_resets_when_a_refresh_changes_the_mask(tmp_path, monkeypatch):
    """DiceSGD with persist_error under a mask refresh in round 2 (every client in every round): the
    stored error feedback is used in round 2 (same mask as round 1), dropped in round 3 (the
    refresh changed the mask and the basis id) and used again in round 4. Catches a refresh that
    does not bump the basis id (stale error of the old mask fed into the new one) and an error
    state that never persists."""
    from fedsim.privacy import plugins

    seen: dict[int, list[bool]] = {}
    begin = plugins.RecordLevelClient.begin

    def spy(self, run, downlink, state):
        round_ = begin(self, run, downlink, state)
        if run.server_round >= 1:
            seen.setdefault(run.server_round, []).append(round_.error is not None)
        return round_

    monkeypatch.setattr(plugins.RecordLevelClient, "begin", spy)
    run = _run(tmp_path, "dice", "federation: {rounds: 4, clients_per_round: 6, local: {epochs: 1, batch_size: 16, "
                                 "lr: 0.1}}\n"
                                 f"pruning: {{sparsity: 0.4, mask_update: every_k_rounds, mask_update_every: 2, "
                                 f"{EXPLORE}}}\n"
                                 "privacy: {mechanism: dicesgd, noise_multiplier: 1.0, persist_error: true, "
                                 "accountant: rdp, delta: 1.0e-3}\n")
    assert [r["round"] for r in read_json(run / "pruning.json")["refreshes"]] == [2, 4]
    assert {t: set(v) for t, v in seen.items()} == {1: {False}, 2: {True}, 3: {False}, 4: {True}}
    assert all(len(v) == 6 for v in seen.values())


@pytest.mark.parametrize("extra,message", [
    ("pruning: {}\nprivacy: {unit: client}\n", "client-level DP does not cover"),
    ("pruning: {}\nprivacy: {grad_sample_mode: ghost}\n", "no per-sample gradients to mask"),
    ("pruning: {kind: random, structured_sparsity: 0.2}\n", "random-mask baseline is unstructured"),
    ("pruning: {sparsity: 1.0}\n", "pruning.sparsity"),
    ("pruning: {explorers: 2, explorer_fraction: 0.5}\n", "give either explorers or explorer_fraction"),
    ("pruning: {mask_update: every_k_rounds}\n", "needs mask_update_every"),
    ("pruning: {mask_update_every: 3}\n", "applies to mask_update: every_k_rounds only"),
    ("pruning: {kind: random, start_from: explored}\n", "the random baseline does not explore"),
    ("pruning: {kind: random, mask_update: every_k_rounds, mask_update_every: 2}\n", "random baseline's mask is static"),
])
def test_pruning_scenario_guards(extra, message):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(BASE + extra)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_more_explorers_than_clients(tmp_path):
    with pytest.raises(ScenarioError, match="pruning.explorers: 9 is more than the 6 clients"):
        _run(tmp_path, "x", "pruning: {explorers: 9}\n")


def test_autoflip_under_dp_sgd(tmp_path, monkeypatch):
    """A12: AutoFLIP with record-level DP-SGD (σ = 1, C = 1). The explorers train under DP-SGD and
    their steps are in their ledgers (round 0 included); per-sample gradients are 0 at masked
    entries whenever Opacus clips; masked entries stay exactly 0; each ε is its events' ε.
    Catches exploration outside DP (steps missing from the ledger), a mask applied only after
    clipping (pruned entries use clip budget), and a mask that noise revives."""
    from fedsim.privacy import Ledger
    from fedsim.privacy.optimizers import PrivateOptimizer

    seen = {"clips": 0, "masked_nonzero": 0}
    original = PrivateOptimizer.clip_and_accumulate

    def checked(self):
        w = self.params[0]                                    # net.1.weight: its zeros are the mask
        zero = w.detach() == 0                                # (none before the mask: random init)
        if getattr(w, "grad_sample", None) is not None and bool(zero.any()):
            seen["clips"] += 1
            seen["masked_nonzero"] += int(w.grad_sample[:, zero].abs().sum() > 0)
        return original(self)

    monkeypatch.setattr(PrivateOptimizer, "clip_and_accumulate", checked)
    run = _run(tmp_path, "dp", f"pruning: {{sparsity: 0.4, {EXPLORE}}}\n"
                               "privacy: {noise_multiplier: 1.0, clip: 1.0, accountant: rdp, delta: 1.0e-3}\n")
    assert seen["clips"] > 0 and seen["masked_nonzero"] == 0
    doc = read_json(run / "privacy.json")
    rows = read_metrics(run, "clients.jsonl")
    explorers = read_json(run / "pruning.json")["exploration"]["explorers"]
    assert {r["client_id"] for r in rows if r["round"] == 0} == set(explorers)
    for cid, entry in doc["clients"].items():
        mine = [r for r in rows if r["client_id"] == int(cid)]
        assert sum(e["steps"] for e in entry["events"]) == sum(r["dp_steps"] for r in mine)
        assert entry["epsilon"] == pytest.approx(Ledger.from_list(entry["events"]).epsilon(1e-3, "rdp"), rel=1e-12)
    assert any(r["round"] == 0 and r["dp_steps"] > 0 for r in rows)
    model, prune = _model(run), read_json(run / "pruning.json")
    zeros = sum(int(np.count_nonzero(model[k] == 0)) for k in prune["pruned"])
    assert zeros >= sum(prune["pruned"].values())


def test_no_torch_prune_in_the_pruning_path():
    """A12's static check: torch.nn.utils.prune breaks under Opacus (buffers); fedsim masks explicitly."""
    root = Path(__file__).resolve().parents[2] / "fedsim"
    for path in [root / "algorithms" / "autoflip.py", root / "algorithms" / "autoflip_plugins.py"]:
        assert "nn.utils.prune" not in path.read_text() and "import prune" not in path.read_text()


def test_dp_calibration_counts_the_exploration_stage():
    """σ is calibrated over τR training steps plus the exploration stage's most steps, so the target
    holds for an explorer that also takes part in every round. Catches exploration left out of
    the calibration (an explorer could overshoot its budget)."""
    from fedsim.builder import build
    from fedsim.federation import Federation
    from fedsim.privacy import Event, epsilon

    scn = parse_scenario(BASE + f"pruning: {{{EXPLORE}, warmup_epochs: 1}}\n"
                                "privacy: {epsilon: 4.0, delta: 1.0e-3, accountant: rdp}\n")
    fed = Federation(scn)
    client = next(p for p in build(scn, fed).client_plugins if p.name == "privacy")
    n = min(fed.client_sizes)
    q, tau = client.sample_rate(n), client.local_steps(n)
    assert client.stage_steps(n) == (3 + 1) * tau                       # (explore + warm-up) epochs of τ steps
    sigma = client.noise_for(n)
    worst = epsilon([Event(sigma, q, tau * 3 + client.stage_steps(n))], 1e-3, "rdp")
    assert 0.98 * 4.0 <= worst <= 4.0
