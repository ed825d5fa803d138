"""FedHyper through the real apps: scenario key, wire contents, metrics, resume (spec H1, H9, H11, H12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.engine import run_scenario
from fedsim.federation import get_federation
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario

ZERO = "beta_g: 0, beta_sl: 0, beta_l: 0, beta_lg: 0"


def _run(tmp_path, text: str, name: str, **kw) -> list[dict]:
    run_scenario(parse_scenario(text), tmp_path / name, progress="none", **kw)
    return read_metrics(tmp_path / name)


def _model(tmp_path, name: str) -> dict:
    return load_file(str(tmp_path / name / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["g", "gm", "sl", "cl", "g+cl", "gm+cl"])
def test_h1_zero_hyper_lr_is_fedavg_end_to_end(tmp_path, tiny_yaml, variant):
    base = tiny_yaml + "engine: {kind: inprocess}\n"
    _run(tmp_path, base, "fedavg")
    rows = _run(tmp_path, base + f"lr_schedule: {{kind: fedhyper, variant: {variant}, {ZERO}}}\n", "hyper")
    assert _same(_model(tmp_path, "fedavg"), _model(tmp_path, "hyper"))
    assert all(r["lr_global"] == 1.0 and r["lr_local_min"] == r["lr_local_max"] == 0.1 for r in rows)


def test_h9_cl_sends_one_extra_trainable_array_set_from_round_2(tmp_path, tiny_yaml):
    base = tiny_yaml + "engine: {kind: inprocess}\n"
    plain = _run(tmp_path, base + "lr_schedule: {kind: fedhyper, variant: g}\n", "g")
    cl = _run(tmp_path, base + "lr_schedule: {kind: fedhyper, variant: g+cl}\n", "gcl")
    fed = get_federation(parse_scenario(base))
    trainable = sum(v.nbytes for k, v in fed.initial_arrays().items() if k in fed.trainable_names())
    cohort = fed.cohort_size
    assert cl[0]["bytes_down"] - plain[0]["bytes_down"] < 64 * cohort          # round 1: no previous update
    extra = cl[1]["bytes_down"] - plain[1]["bytes_down"]
    assert cohort * trainable <= extra <= cohort * (trainable + 1024)


def test_h12_sl_learning_rate_reaches_clients(tmp_path, tiny_yaml):
    text = tiny_yaml.replace("rounds: 3", "rounds: 4") + "engine: {kind: inprocess}\n" \
        "lr_schedule: {kind: fedhyper, variant: sl, beta_sl: 50}\n"
    rows = _run(tmp_path, text, "sl")
    for r in rows[:2]:                                                          # rounds 1-2 use eta0
        assert r["lr_local_min"] == r["lr_local_max"] == 0.1
    assert rows[2]["lr_local_min"] == rows[2]["lr_local_max"] != 0.1            # one LR for all, changed
    assert 0.01 <= rows[3]["lr_local_mean"] <= 1.0                             # within [eta0/10, 10 eta0]


@pytest.mark.parametrize("variant", ["gm", "g+cl"])
def test_h11_resume_continues_the_trajectory_exactly(tmp_path, tiny_yaml, variant):
    text = tiny_yaml.replace("rounds: 3", "rounds: 4") + "engine: {kind: inprocess}\n" \
        f"output: {{checkpoint_every: 1}}\nlr_schedule: {{kind: fedhyper, variant: {variant}}}\n"
    full = _run(tmp_path, text, "full")
    _run(tmp_path, text.replace("rounds: 4", "rounds: 2"), "cut")
    resumed = _run(tmp_path, text, "cut", resume=True)
    assert [r["lr_global"] for r in resumed] == [r["lr_global"] for r in full]
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    assert _same(_model(tmp_path, "full"), _model(tmp_path, "cut"))


def test_resume_refuses_another_scenario(tmp_path, tiny_yaml):
    from fedsim.flower.runner import ResumeError
    text = tiny_yaml + "engine: {kind: inprocess}\noutput: {checkpoint_every: 1}\n"
    _run(tmp_path, text, "r")
    with pytest.raises(ResumeError, match="differs"):
        _run(tmp_path, text.replace("lr: 0.1", "lr: 0.2"), "r", resume=True)


@pytest.mark.integration
def test_fedhyper_on_workers_matches_inprocess_and_plots_lr(tmp_path, tiny_yaml):
    sched = "lr_schedule: {kind: fedhyper, variant: gm+cl}\n"
    _run(tmp_path, tiny_yaml + sched + "engine: {kind: inprocess}\n", "a")
    _run(tmp_path, tiny_yaml + sched + "engine: {kind: workers, workers: 2}\n", "b")
    assert _same(_model(tmp_path, "a"), _model(tmp_path, "b"))
    assert (tmp_path / "b/plots/lr.png").stat().st_size > 1000
    assert json.loads((tmp_path / "b/summary.json").read_text())["engine"] == "workers"
