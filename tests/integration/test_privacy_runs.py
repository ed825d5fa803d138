"""Privacy through the real engines: per-client cumulative ε in privacy.json agrees with an
independent accountant recomputed from its events, calibration never overshoots, the budget
guard stops a client and the run goes on, DiceSGD's error buffer never leaves the client,
client-level DP, FedHyper on top of DP changes no ε (H10), and the scenario guards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fedsim.engine import run_scenario
from fedsim.results import read_metrics
from fedsim.scenario import ScenarioError, parse_scenario

BASE = """\
name: dp
seed: 3
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 6, alpha: 0.5, min_size: 20}
model: {name: mlp, options: {hidden: [16]}}
federation:
  rounds: 3
  clients_per_round: 3
  local: {epochs: 1, batch_size: 16, lr: 0.1}
engine: {kind: inprocess}
"""


def _run(tmp_path: Path, name: str, privacy: str, extra: str = "", **kw) -> Path:
    sections = {**(yaml.safe_load(extra) or {}), "privacy": yaml.safe_load(privacy)}     # extra replaces BASE's
    scn = parse_scenario(BASE, overrides=[f"{k}={json.dumps(v)}" for k, v in sections.items()])
    run_scenario(scn, tmp_path / name, progress="none", **kw)
    return tmp_path / name


def _dp_accounting_rdp(events: list[dict], delta: float) -> float:
    import dp_accounting
    logging.getLogger("absl").setLevel(logging.ERROR)
    acc = dp_accounting.rdp.RdpAccountant()
    for e in events:
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            e["sample_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])), e["steps"]))
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """DP-SGD calibrated to ε = 8 (RDP) over the run."""
    return _run(tmp_path_factory.mktemp("dp"), "cal", "{epsilon: 8.0, delta: 1.0e-5, accountant: rdp}")


def test_privacy_json_agrees_with_an_independent_accountant(calibrated):
    """Catches a per-round (non-cumulative) ε, steps counted wrongly, or a mirror that drops rounds."""
    doc = json.loads((calibrated / "privacy.json").read_text())
    assert (doc["unit"], doc["mechanism"], doc["accountant"], doc["delta"], doc["target_epsilon"]) == \
        ("example", "dpsgd", "rdp", 1e-5, 8.0)
    assert "max_participation" in doc["calibration"]["assumption"]
    clients = read_metrics(calibrated, "clients.jsonl")
    assert doc["clients"] and set(doc["clients"]) == {str(c["client_id"]) for c in clients}
    for cid, entry in doc["clients"].items():
        mine = [c for c in clients if c["client_id"] == int(cid)]
        assert sum(e["steps"] for e in entry["events"]) == sum(c["dp_steps"] for c in mine) == mine[-1]["dp_steps_total"]
        independent = _dp_accounting_rdp(entry["events"], 1e-5)
        assert entry["epsilon"] == pytest.approx(independent, rel=0.01)
        assert entry["epsilon"] == pytest.approx(mine[-1]["epsilon"], rel=1e-12)
        assert 0 < entry["epsilon"] <= 8.0


def test_epsilon_is_cumulative_monotone_and_reported_every_round(calibrated):
    """DS12 through the engine: a client's ε after P rounds is that of one event (σ, q, τ P); it never
    decreases; metrics.jsonl's epsilon_max is the max over every client so far."""
    from fedsim.privacy import Event, epsilon

    clients = read_metrics(calibrated, "clients.jsonl")
    rows = read_metrics(calibrated)
    seen: dict[int, float] = {}
    for row in rows:
        for c in (c for c in clients if c["round"] == row["round"]):
            participated = sum(1 for d in clients if d["client_id"] == c["client_id"] and d["round"] <= row["round"])
            tau = c["dp_steps"]
            expected = epsilon([Event(c["dp_noise_multiplier"], c["dp_sample_rate"], tau * participated)], 1e-5, "rdp")
            assert c["epsilon"] == pytest.approx(expected, rel=1e-9)
            assert c["epsilon"] >= seen.get(c["client_id"], 0.0)
            seen[c["client_id"]] = c["epsilon"]
        assert row["epsilon_max"] == pytest.approx(max(seen.values()), rel=1e-12)
        assert row["epsilon_mean"] == pytest.approx(np.mean(list(seen.values())), rel=1e-12)
    assert (calibrated / "plots" / "privacy.png").stat().st_size > 1000
    assert json.loads((calibrated / "summary.json").read_text())["epsilon"] == rows[-1]["epsilon_max"]


def test_budget_guard_stops_a_client_and_the_run_goes_on(tmp_path):
    """Explicit σ with an ε cap: a client whose next round would exceed the cap does not train and
    says so (catches a guard that lets the spend pass the target)."""
    run = _run(tmp_path, "cap", "{noise_multiplier: 0.6, epsilon: 9.0, accountant: rdp}",
               extra="federation:\n  rounds: 4\n  clients_per_round: 6\n  local: {epochs: 1, batch_size: 16, lr: 0.1}\n")
    rows = read_metrics(run)
    reasons = [r for row in rows for r in row.get("rejected_reasons", [])]
    assert reasons and all("PrivacyBudgetExhausted" in r and "does not train" in r for r in reasons)
    first = next(i for i, row in enumerate(rows) if row.get("rejected"))
    assert len(rows) == 4 and any(row["clients"] > 0 for row in rows[first:])      # the run goes on
    doc = json.loads((run / "privacy.json").read_text())
    assert all(e["epsilon"] <= 9.0 for e in doc["clients"].values())


def _windows(arr: np.ndarray, width: int = 64) -> list[bytes]:
    data = np.ascontiguousarray(arr, np.float32).tobytes()
    return [data[i:i + width] for i in range(0, len(data) - width + 1, width)]


def test_dicesgd_error_buffer_never_leaves_the_client(tmp_path, monkeypatch):
    """DS10: with persist_error, no 64-byte window of e's fp32 bytes appears in any reply, in the
    metrics, logs, privacy.json or the server checkpoint (catches e sent, logged or checkpointed)."""
    from fedsim.engine import inprocess
    from fedsim.flower.codec import load_client_state
    from fedsim.flower.compat import message_to_bytes
    from fedsim.flower.state_store import load_state

    wire: list[bytes] = []
    handle = inprocess.InProcessGrid._handle

    def spy(self, msg):
        reply = handle(self, msg)
        wire.append(message_to_bytes(reply))
        return reply
    monkeypatch.setattr(inprocess.InProcessGrid, "_handle", spy)
    run = _run(tmp_path, "dice", "{mechanism: dicesgd, noise_multiplier: 0.8, persist_error: true, clip: 0.1, "
               "accountant: rdp}", extra="output: {checkpoint_every: 1}\n")
    windows = []
    for node in (run / "client_state").glob("node-*.pb"):
        cid = int(node.stem.removeprefix("node-")) - 1000
        state = load_client_state(load_state(run / "client_state", 1000 + cid), cid, "privacy")
        for e in (state or {}).get("error", {}).values():
            windows += [w for w in _windows(e) if any(w)]
    assert len(windows) > 10, "the run should leave non-zero error buffers in the client state"
    public = b"".join(wire)
    files = [*run.glob("*.json*"), *run.glob("*.csv"), *run.glob("*.yaml"), run / "model.safetensors",
             *(run / "checkpoints").glob("*.safetensors"), *(run / "logs").glob("*"), *(run / "plots").glob("*")]
    public += b"".join(f.read_bytes() for f in files if f.is_file())
    assert not [w for w in windows if w in public]
    keys = {k for c in read_metrics(run, "clients.jsonl") for k in c}
    assert not {k for k in keys if "error" in k}


def test_client_level_dp(tmp_path):
    """unit: client — one population ledger (q = m/N, a step per round); the model is noised."""
    from fedsim.privacy import Event, epsilon

    run = _run(tmp_path, "cl", "{unit: client, noise_multiplier: 0.5, clip: 1.0, delta: 0.01, accountant: rdp}")
    doc = json.loads((run / "privacy.json").read_text())
    assert doc["unit"] == "client" and list(doc["clients"]) == ["all"]
    assert doc["clients"]["all"]["events"] == [{"noise_multiplier": 0.5, "sample_rate": 0.5, "steps": 3}]
    assert doc["clients"]["all"]["epsilon"] == pytest.approx(epsilon([Event(0.5, 0.5, 3)], 0.01, "rdp"), rel=1e-12)
    run_scenario(parse_scenario(BASE), tmp_path / "plain", progress="none")
    a, b = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "plain/model.safetensors"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_fedhyper_on_dp_changes_no_epsilon(tmp_path):
    """H10: G+CL and GM+CL are post-processing: each client's ε equals that of FedAvg + DP."""
    dp = "{noise_multiplier: 1.0, accountant: rdp}"
    plain = json.loads((_run(tmp_path, "avg", dp) / "privacy.json").read_text())["clients"]
    for variant in ("g+cl", "gm+cl"):
        hyper = json.loads((_run(tmp_path, variant, dp, extra=f"lr_schedule: {{kind: fedhyper, variant: {variant}}}\n")
                            / "privacy.json").read_text())["clients"]
        assert {c: e["events"] for c, e in hyper.items()} == {c: e["events"] for c, e in plain.items()}
        assert {c: e["epsilon"] for c, e in hyper.items()} == {c: e["epsilon"] for c, e in plain.items()}


@pytest.mark.integration
def test_dp_on_workers_matches_inprocess(tmp_path):
    """Poisson sampling and noise are pure functions of (seed, round, client): same model on every engine."""
    dp = "{mechanism: dicesgd, noise_multiplier: 1.0, accountant: rdp}"
    a = _run(tmp_path, "a", dp)
    b = _run(tmp_path, "b", dp, extra="engine: {kind: workers, workers: 2}\n")
    ma, mb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    assert json.loads((a / "privacy.json").read_text())["clients"] == json.loads((b / "privacy.json").read_text())["clients"]


WIDE_MLP = "model: {name: mlp, options: {hidden: [800]}}\n"      # 64 x 800 = 51,200 weights in one Linear


def test_ghost_clipping_trains_the_model_hooks_trains(tmp_path):
    """Ghost clipping (chosen by auto for a model dominated by a large Linear) gives the model that
    hooks' materialised per-sample gradients give, noise included (same draws, same order).

    Catches ghost clipping at another C (max_grad_norm not passed to the module), no noise or
    noise at another scale on the ghost path, the loss wrapper's second (clipped) pass skipped,
    an empty Poisson batch breaking it, and auto never picking ghost."""
    dp = "{noise_multiplier: 0.8, clip: 0.3, accountant: rdp}"
    base = BASE.replace("model: {name: mlp, options: {hidden: [16]}}\n", WIDE_MLP)
    runs = {}
    for mode in ("auto", "hooks"):
        out = tmp_path / mode
        run_scenario(parse_scenario(base + f"privacy: {dp[:-1]}, grad_sample_mode: {mode}}}\n"), out, progress="none")
        runs[mode] = out
    doc = json.loads((runs["auto"] / "privacy.json").read_text())
    assert doc["grad_sample_mode"]["mode"] == "ghost" and "51200" in doc["grad_sample_mode"]["why"]
    assert json.loads((runs["hooks"] / "privacy.json").read_text())["grad_sample_mode"]["mode"] == "hooks"
    ghost, hooks = (load_file(str(runs[m] / "model.safetensors")) for m in ("auto", "hooks"))
    assert set(ghost) == set(hooks)
    for k in ghost:
        np.testing.assert_allclose(ghost[k], hooks[k], rtol=0, atol=2e-5, err_msg=k)
    assert doc["clients"] == json.loads((runs["hooks"] / "privacy.json").read_text())["clients"]


@pytest.mark.parametrize("mechanism,setting", [("dpsgd", ", lr_divide_by_c1: true"), ("dicesgd", "")])
def test_lr_divide_by_c1(tmp_path, mechanism, setting):
    """lr / C1 is lr 0.2 at C1 = 0.5, bit for bit: explicit for DP-SGD, the default for DiceSGD.
    Catches the option ignored for one mechanism, or the default flipped."""
    dp = f"{{mechanism: {mechanism}, clip: 0.5, noise_multiplier: 1.0, accountant: rdp"
    divided = _run(tmp_path, "divided", dp + setting + "}")
    plain = _run(tmp_path, "plain", dp + ", lr_divide_by_c1: false}")
    doubled = tmp_path / "doubled"
    run_scenario(parse_scenario(BASE.replace("lr: 0.1", "lr: 0.2") + f"privacy: {dp}, lr_divide_by_c1: false}}\n"),
                 doubled, progress="none")
    assert _models_equal(divided, doubled) and not _models_equal(divided, plain)


def _models_equal(a: Path, b: Path) -> bool:
    ma, mb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return set(ma) == set(mb) and all(np.array_equal(ma[k], mb[k]) for k in ma)


def test_auto_grad_sample_mode():
    """Catches auto choosing ghost for DiceSGD (which needs per-sample gradients) or for a model
    whose large layers are not most of the trainable weights (the quickstart CNN, LoRA-style B)."""
    from fedsim.models import build_model
    from fedsim.privacy.plugins import auto_grad_sample_mode

    wide = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=[128])
    assert auto_grad_sample_mode(wide, "dpsgd")[0] == "ghost"
    assert auto_grad_sample_mode(wide, "dicesgd")[0] == "hooks"
    assert auto_grad_sample_mode(build_model("cnn", input_shape=(1, 8, 8), num_classes=10), "dpsgd")[0] == "hooks"
    frozen = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=[128])
    frozen.net[1].weight.requires_grad_(False)
    assert auto_grad_sample_mode(frozen, "dpsgd")[0] == "hooks"


def test_delta_must_be_below_one_over_the_smallest_client(tmp_path):
    with pytest.raises(ScenarioError, match=r"privacy.delta: 0.1 must be below 1/\|D_k\| = .* for the smallest client"):
        _run(tmp_path, "d", "{delta: 0.1}")


@pytest.mark.parametrize("privacy,message", [
    ("{grad_sample_mode: ghost, mechanism: dicesgd}", "ghost materialises no per-sample gradients"),
    ("{unit: client, mechanism: dicesgd}", "record-level mechanism"),
    ("{persist_error: true}", "only DiceSGD has an error state"),
    ("{clip: 0}", "privacy.clip: must be > 0"),
    ("{error_clip_ratio: -1}", "privacy.error_clip_ratio: must be >= 0"),
    ("{epsilon: 0}", "privacy.epsilon: must be > 0"),
    ("{delta: 1.5}", "privacy.delta: must be < 1"),
])
def test_privacy_scenario_guards(privacy, message):
    """DS13 and the issue's validation: each bad combination is refused with its path (exit 2)."""
    with pytest.raises(ScenarioError) as info:
        parse_scenario(BASE + f"privacy: {privacy}\n")
    assert any(message in p for p in info.value.problems), info.value.problems


def test_unsupported_combinations_name_the_reason():
    with pytest.raises(ScenarioError, match="char_lstm cannot train under record-level privacy"):
        parse_scenario(BASE.replace("{name: mlp, options: {hidden: [16]}}", "{name: char_lstm}") + "privacy: {}\n")
    with pytest.raises(ScenarioError, match="fedprox's proximal term has no per-sample gradient"):
        parse_scenario(BASE + "strategy: {name: fedprox}\nprivacy: {}\n")
