"""Robust aggregation (fedsim.algorithms.robust): the pure rules on known arrays, their invariances,
Krum's choice and its precondition, the server plugin through the pure Server, and the scenario
keys (schema errors and builder errors with their YAML paths)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.algorithms.robust import (RULES, RobustAggregation, check_krum, krum, krum_scores, median, multi_krum,
                                      pairwise_sq_distances, robust_update, trim_count, trimmed_mean, update_norms)
from fedsim.builder import build
from fedsim.core import Server, scale
from fedsim.core.server import ClientUpdate
from fedsim.federation import Federation
from fedsim.scenario import ScenarioError, config_sha256, parse_scenario, resolved

RNG = np.random.default_rng(7)


# ------------------------------------------------------------------------------- the pure rules


def test_median_of_known_arrays():
    """Catches a median over the wrong axis (per client instead of per coordinate), and an even
    count taking one middle value instead of the mean of both."""
    odd = np.array([[1.0, 9.0], [3.0, -1.0], [2.0, 4.0]])
    assert median(odd).tolist() == [2.0, 4.0]
    even = np.array([[[1.0]], [[4.0]], [[2.0]], [[100.0]]])           # any shape per client
    assert median(even).shape == (1, 1) and median(even).item() == 3.0


def test_trimmed_mean_of_known_arrays():
    """Catches trimming one side only, trimming per client, or trimming ceil instead of floor."""
    u = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, -30.0], [3.0, 30.0], [-100.0, 50.0]])
    assert trimmed_mean(u, 0.2).tolist() == [1.0, 20.0]                 # k = 1 per side
    assert trimmed_mean(u, 0.39).tolist() == [1.0, 20.0]                # floor(1.95) = 1
    assert trimmed_mean(u, 0.4).tolist() == [1.0, 20.0]                 # k = 2: the median of 5
    assert [trim_count(10, t) for t in (0.0, 0.1, 0.19, 0.2, 0.3, 0.49)] == [0, 1, 1, 2, 3, 4]


def test_trimmed_mean_with_trim_zero_is_the_mean():
    """Catches a trim of 0 that still drops values (k computed as ceil or at least 1)."""
    u = RNG.normal(size=(9, 3, 4))
    np.testing.assert_allclose(trimmed_mean(u, 0.0), u.mean(axis=0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7])
def test_trimmed_mean_refuses_a_trim_outside_zero_to_a_half(trim):
    """Catches a trim of 1/2 or more (nothing would be left) silently returning NaN."""
    with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\)"):
        trimmed_mean(np.ones((4, 2)), trim)


def test_empty_input_is_a_clear_error():
    """Catches np.median / mean of nothing returning NaN with only a warning."""
    for fn in (median, lambda u: trimmed_mean(u, 0.1), lambda u: multi_krum(u, 0)):
        with pytest.raises(ValueError, match="at least one update"):
            fn(np.zeros((0, 3)))


def test_every_rule_is_invariant_to_client_order():
    """Catches any dependence on reply order (a Krum tie-break on position with distinct scores, an
    unsorted float sum in the trimmed mean): the result is bit-identical for every permutation."""
    u = RNG.normal(size=(10, 5))
    u[3] *= 30                                                           # an outlier to cut
    perm = RNG.permutation(10)
    assert np.array_equal(trimmed_mean(u, 0.2), trimmed_mean(u[perm], 0.2))
    assert np.array_equal(trimmed_mean(u, 0.0), trimmed_mean(u[perm], 0.0))
    assert np.array_equal(median(u), median(u[perm]))
    assert set(perm[krum(u[perm], 2, m=6)]) == set(krum(u, 2, m=6))
    assert np.array_equal(multi_krum(u, 2), multi_krum(u[perm], 2))
    x = {"w": np.zeros((5,), np.float32), "b": np.zeros((2,), np.float32)}
    clients = [{"w": (u[i]).astype(np.float32), "b": u[i, :2].astype(np.float32)} for i in range(10)]
    for rule in RULES:
        a = robust_update(x, clients, rule, trim=0.2, byzantine=2)
        b = robust_update(x, [clients[i] for i in perm], rule, trim=0.2, byzantine=2)
        assert all(np.array_equal(a[k], b[k]) for k in a), rule


def test_krum_scores_by_hand():
    """Catches counting the point itself among its neighbours, or the n - f neighbours instead of
    n - f - 2: on the line 0, 1, 2, 3, 10 with f = 1 each point sums its 2 nearest squared distances."""
    u = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    d = pairwise_sq_distances([u])
    assert d[0].tolist() == [0.0, 1.0, 4.0, 9.0, 100.0]
    assert krum_scores(d, 1).tolist() == [5.0, 2.0, 2.0, 5.0, 113.0]
    assert krum(u, 1).tolist() == [1]                                  # tie 1/2: the lower index


def test_krum_picks_the_honest_cluster():
    """Three colluding attackers sit together far away (a tight cluster of their own): Krum with
    f = 3 still keeps only honest updates, and multi-Krum's n - f are exactly the honest ones.
    Catches scores over all other points (the attackers' cluster would win), or an argsort the
    wrong way round."""
    honest = RNG.normal(0.0, 1.0, size=(7, 20))
    attackers = RNG.normal(8.0, 0.01, size=(3, 20))
    u = np.vstack([attackers[:1], honest[:4], attackers[1:], honest[4:]])       # mixed positions
    honest_idx = {1, 2, 3, 4, 7, 8, 9}
    assert set(krum(u, 3).tolist()) <= honest_idx
    assert set(krum(u, 3, m=7).tolist()) == honest_idx
    np.testing.assert_allclose(multi_krum(u, 3), honest.mean(axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,f", [(6, 2), (4, 1), (2, 0), (8, 3)])
def test_krum_refuses_too_many_attackers_for_n(n, f):
    """Krum needs n > 2f + 2. Catches an off-by-one (n >= 2f + 2 accepted) or a silent fallback
    that would run Krum with fewer neighbours than it needs."""
    with pytest.raises(ValueError, match=rf"f={f} attackers needs n > 2f \+ 2 = {2 * f + 2} updates, got n={n}"):
        krum(np.zeros((n, 3)), f)
    krum(np.zeros((n + 1, 3)), f)                                      # one more update is enough


@pytest.mark.parametrize("f", [-1, 1.5, True])
def test_krum_refuses_a_bad_f(f):
    """Catches a negative, fractional or boolean f being used as a count."""
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        check_krum(10, f)


def test_update_norms_and_robust_update_on_named_arrays():
    """Integer buffers and arrays the clients did not send get a zero update and count in no
    norm; the coordinate-wise rules act per array. Catches a counter averaged like a weight, and
    Krum distances over one array only."""
    x = {"w": np.ones((2, 2), np.float32), "n": np.zeros((), np.int64), "frozen": np.ones(3, np.float32)}
    clients = [{"w": np.ones((2, 2), np.float32) + v, "n": np.array(9, np.int64)} for v in (1.0, 2.0, 3.0, -50.0)]
    assert update_norms(x, clients).tolist() == [2.0, 4.0, 6.0, 100.0]
    med = robust_update(x, clients, "median")
    assert med["w"].tolist() == [[1.5, 1.5], [1.5, 1.5]]
    assert med["n"].tolist() == 0 and med["frozen"].tolist() == [0, 0, 0]
    assert robust_update(x, clients, "trimmed_mean", trim=0.25)["w"].tolist() == [[1.5, 1.5], [1.5, 1.5]]
    kr = robust_update(x, clients + [clients[0]], "krum", byzantine=1)
    assert kr["w"].tolist() == [[1.75, 1.75], [1.75, 1.75]]             # the 4 best of 5: 1, 1, 2, 3
    with pytest.raises(ValueError, match="unknown robust rule"):
        robust_update(x, clients, "mean")


# ------------------------------------------------------------------------------ the server plugin
X = {"w": np.zeros(3, np.float32)}


def _replies(values, cids=None) -> list[ClientUpdate]:
    return [ClientUpdate(c, 1.0 + c, {"w": np.full(3, v, np.float32)})
            for c, v in zip(cids or range(len(values)), values)]


def _step(plugin: RobustAggregation, replies: list[ClientUpdate]) -> tuple[dict, dict]:
    """One round as the strategy runs it: screen the replies, then aggregate the kept ones."""
    server = Server(scale(1.0), [plugin])
    state = server.init(X)
    plan = server.plan(state, 1, X)
    state, kept, _ = server.screen(state, plan, X, replies)
    params, _, metrics = server.aggregate(state, plan, X, kept)
    return params, metrics


@pytest.mark.parametrize("rule,expected", [("median", 1.0), ("trimmed_mean", 4 / 3), ("krum", 1.5)])
def test_the_plugin_replaces_the_mean_through_the_server(rule, expected):
    """Through the pure Server's combine seam: one attacker at -100 moves the weighted mean far
    away but not the robust aggregates (median of 1, 2, 1, 2, -100: 1; trimmed 1 per side: 4/3;
    multi-Krum keeps 4: 1.5). Catches the plugin not being asked, or the example weights (1..5)
    leaking into a robust rule."""
    params, metrics = _step(RobustAggregation("robust", rule=rule, trim=0.25, byzantine=1),
                            _replies([1.0, 2.0, 1.0, 2.0, -100.0]))
    assert params["w"].tolist() == pytest.approx([expected] * 3, rel=1e-7)     # the weighted mean: -32.3
    assert (metrics.get("krum_fallback") == 0) == (rule == "krum")


def test_the_norm_guard_leaves_big_updates_out_and_counts_them():
    """max_update_norm: the reply with a huge update is left out of the (weighted) mean and
    counted. Catches a guard that clips instead (the attacker would still pull the mean), one
    that compares squared norms, and an unweighted mean of the rest."""
    replies = _replies([1.0, 3.0, 1e30])                                # norms sqrt(3), 3 sqrt(3), 1.7e30
    params, metrics = _step(RobustAggregation("robust", rule=None, max_update_norm=5.3), replies)
    assert params["w"].tolist() == pytest.approx([(1 * 1.0 + 2 * 3.0) / 3] * 3)
    assert metrics == {"lr_global": 1.0, "update_norm_rejected": 1}
    params, metrics = _step(RobustAggregation("robust", rule=None, max_update_norm=5.1), replies)
    assert params["w"].tolist() == [1.0] * 3 and metrics["update_norm_rejected"] == 2


def test_refused_replies_reach_no_other_plugin_and_carry_kind_and_reason():
    """The guard refuses before aggregation: a plugin after it (here a recorder standing in for
    SCAFFOLD's c or FedHyper's hypergradient) sees only the kept replies, and each refusal names
    the client, the kind and the norm. Catches the old guard that only left the reply out of the
    model mean while every other plugin still folded it in."""
    from fedsim.core.server import PluginUpdate, ServerPlugin

    class Recorder(ServerPlugin):
        name = "recorder"
        seen: list[int] = []

        def aggregate(self, state, result):
            Recorder.seen = [r.cid for r in result.replies]
            return PluginUpdate(state)

    server = Server(scale(1.0), [RobustAggregation("robust", rule=None, max_update_norm=5.3), Recorder()])
    state = server.init(X)
    plan = server.plan(state, 1, X)
    state, kept, refused = server.screen(state, plan, X, _replies([1.0, 1e30, 3.0]))
    server.aggregate(state, plan, X, kept)
    assert Recorder.seen == [0, 2]
    assert [(u.cid, reason, kind) for u, reason, kind in refused] == [
        (1, "update norm 1.732e+30 exceeds strategy.max_update_norm (5.3)", "update_norm")]
    from fedsim.flower.replies import reason_kind
    assert reason_kind(refused[0][1]) == "update_norm"      # metrics.jsonl readers recover the kind from the text


def test_a_round_whose_every_update_is_too_big_keeps_the_model():
    """Catches a guard that leaves nothing and then divides by zero (mean of no clients)."""
    params, metrics = _step(RobustAggregation("robust", rule="median", max_update_norm=1.0), _replies([5.0, -5.0]))
    assert params["w"].tolist() == [0.0] * 3 and metrics["update_norm_rejected"] == 2


def test_krum_with_too_few_accepted_replies_falls_back_to_the_median():
    """Rejections can leave fewer replies than Krum needs (n <= 2f + 2): the round goes on with the
    coordinate-wise median and says so. Catches the server crashing on client input (Krum's
    ValueError) in the middle of a run."""
    params, metrics = _step(RobustAggregation("robust", rule="krum", byzantine=2), _replies([1.0, 2.0, 30.0]))
    assert params["w"].tolist() == [2.0] * 3 and metrics["krum_fallback"] == 1


def test_the_plugin_refuses_impossible_settings():
    """Catches settings that could only fail at the first round."""
    for kwargs, match in (({"rule": "mean"}, "unknown robust rule"), ({"rule": "trimmed_mean", "trim": 0.5}, "trim"),
                          ({"rule": "krum", "byzantine": -1}, "integer >= 0"),
                          ({"rule": None, "max_update_norm": 0.0}, "max_update_norm")):
        with pytest.raises(ValueError, match=match):
            RobustAggregation("robust", **kwargs)


# ---------------------------------------------------------------------------- the scenario keys
BASE = """\
name: rob
data: {dataset: digits, partition: {kind: iid, num_clients: 10}}
model: {name: mlp, options: {hidden: [8]}}
federation: {rounds: 1, clients_per_round: 8}
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        scn = parse_scenario(text)
        build(scn, Federation(scn))
    return err.value.problems


@pytest.mark.parametrize("strategy,problem", [
    ("{name: fedavg, robust: krum}", "strategy.robust_byzantine: robust: krum needs robust_byzantine"),
    ("{name: fedadam, robust: median, robust_byzantine: 1}", "strategy.robust_byzantine: applies to robust: krum only"),
    ("{name: fedprox, robust: median, robust_trim: 0.2}", "strategy.robust_trim: applies to robust: trimmed_mean only"),
    ("{name: fedavg, robust_trim: 0.2}", "strategy.robust_trim: applies to robust: trimmed_mean only"),
    ("{name: fedavg, robust: trimmed_mean, robust_trim: 0.5}", "strategy.robust_trim: must be < 0.5"),
    ("{name: scaffold, robust: krum, robust_byzantine: 0}", "strategy.robust_byzantine: must be >= 1"),
    ("{name: fedavgm, robust: mean}", "strategy.robust: Input should be 'trimmed_mean', 'median' or 'krum'"),
    ("{name: fedavg, max_update_norm: 0}", "strategy.max_update_norm: must be > 0"),
    ("{name: fedavg, robust: krum, robust_byzantine: 3}",
     "strategy.robust_byzantine: Krum with f=3 attackers needs more than 2f + 2 = 8 clients per round; "
     "this scenario samples 8"),
])
def test_bad_robust_settings_are_scenario_errors_with_their_yaml_path(strategy, problem):
    """Catches settings that would be ignored silently (a trim without the trimmed mean, an f
    without Krum) or fail mid-run (Krum's n > 2f + 2 against clients_per_round), and errors
    without the key's path."""
    found = _problems(BASE + f"strategy: {strategy}\n")
    assert len(found) == 1 and found[0].startswith(problem), found


@pytest.mark.parametrize("key", ["robust: median", "max_update_norm: 10"])
def test_robust_aggregation_and_client_level_dp_do_not_combine(key):
    """Client-level DP's noised sum is the aggregate its guarantee is about; catches the two
    plugins meeting at the first round ("several plugins replace the aggregation")."""
    found = _problems(BASE + f"strategy: {{name: fedavg, {key}}}\n"
                      "privacy: {unit: client, noise_multiplier: 1.0, delta: 0.01}\n")
    assert len(found) == 1 and found[0].startswith(f"strategy.{key.split(':')[0]}: client-level DP"), found


def test_the_builder_adds_the_plugin_only_when_asked_and_notes_a_useless_trim():
    """Catches the plugin being added to every run (a changed aggregation for everyone), and a
    trim that rounds down to nothing going unnoticed."""
    plain = parse_scenario(BASE)
    assert [p.name for p in build(plain, Federation(plain)).server.plugins] == []
    scn = parse_scenario(BASE + "strategy: {name: scaffold, robust: krum, robust_byzantine: 2}\n")
    algs = build(scn, Federation(scn))
    plugin = algs.server.plugins[-1]
    assert [p.name for p in algs.server.plugins] == ["scaffold", "robust"]
    assert (plugin.rule, plugin.byzantine, plugin.max_update_norm) == ("krum", 2, None)
    scn = parse_scenario(BASE + "strategy: {name: fedavg, robust: trimmed_mean, robust_trim: 0.1}\n")
    notes = build(scn, Federation(scn)).notes
    assert any("trims none" in n for n in notes), notes                  # floor(0.1 x 8) = 0


def test_unused_robust_keys_leave_the_resolved_config_and_its_fingerprint_unchanged():
    """Catches every existing run's config_sha256 changing (resume and sweep caches refusing old
    runs) because the new keys appear in the resolved config at their defaults; when set, they are
    recorded, after the strategy's own keys."""
    plain = parse_scenario(BASE)
    assert resolved(plain)["strategy"] == {"name": "fedavg", "server_lr": 1.0}
    explicit = parse_scenario(BASE + "strategy: {name: fedavg, robust: null, max_update_norm: null}\n")
    assert config_sha256(explicit) == config_sha256(plain)
    used = parse_scenario(BASE + "strategy: {name: fedavg, robust: trimmed_mean, robust_trim: 0.25}\n")
    assert list(resolved(used)["strategy"]) == ["name", "server_lr", "robust", "robust_trim"]
    assert config_sha256(used) != config_sha256(plain)
    again = parse_scenario(BASE + "strategy: " + str(resolved(used)["strategy"]).replace("'", "") + "\n")
    assert again.strategy == used.strategy
