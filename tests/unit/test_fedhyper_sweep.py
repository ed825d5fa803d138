"""The FedHyper robustness-grid harness (benchmarks/papers/fedhyper.py): table maths, subset
selection, and that every method x cell of the grid file is a valid scenario (no training)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "papers" / "fedhyper.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("fedhyper_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


fh = _load_module()


@pytest.fixture(scope="module")
def grid():
    return fh.load_grid()


# ------------------------------------------------------------------ table maths
def test_gain_points():
    assert fh.gain_points(0.80, 0.75) == pytest.approx(5.0)
    assert fh.gain_points(0.70, 0.75) == pytest.approx(-5.0)
    assert fh.gain_points(None, 0.75) is None
    assert fh.gain_points(0.8, None) is None


def test_rounds_to_target_skips_unevaluated_rounds():
    """The sweep uses fedsim.results.rounds_to_target for its rounds-to-target column."""
    from fedsim.results import rounds_to_target
    rows = [{"round": r, "eval_accuracy": a} for r, a in [(1, 0.4), (2, None), (3, 0.69), (4, 0.70), (5, 0.9)]]
    assert rounds_to_target(rows, [0.7]) == {"0.7": 4}
    assert rounds_to_target(rows, [0.95]) == {"0.95": None}
    assert rounds_to_target([{"round": 1, "eval_accuracy": None}, {"round": 2}], [0.1]) == {"0.1": None}


def test_speedup_both_reached():
    value, text = fh.speedup(baseline_rounds=12, method_rounds=4, total_rounds=15)
    assert value == pytest.approx(3.0) and text == "3.00x"
    value, text = fh.speedup(4, 8, 15)
    assert value == pytest.approx(0.5) and text == "0.50x"


def test_speedup_never_and_lower_bound():
    assert fh.speedup(None, 5, 15) == (None, ">3.00x")  # FedAvg would need more than 15 rounds
    assert fh.speedup(5, None, 15) == (None, "never")
    assert fh.speedup(None, None, 15) == (None, "-")
    assert fh.fmt_rounds(None) == "never" and fh.fmt_rounds(7) == "7"


def _res(acc, rtt, rounds=15):
    return fh.RunResult(final_accuracy=acc, best_accuracy=acc, rounds=rounds, rounds_to_target=rtt)


def test_build_rows_and_summary():
    cells = [(0.5, 0.001), (1.0, 0.1)]
    results = {
        ("fedavg", 0.5, 0.001): _res(0.50, None), ("fedhyper-g+cl", 0.5, 0.001): _res(0.62, 9),
        ("fedavg", 1.0, 0.1): _res(0.80, 6), ("fedhyper-g+cl", 1.0, 0.1): _res(0.79, 3),
    }
    rows = fh.build_rows(cells, ["fedavg", "fedhyper-g+cl"], results)
    assert [(r.global_lr, r.local_lr, r.method) for r in rows] == [
        (0.5, 0.001, "fedavg"), (0.5, 0.001, "fedhyper-g+cl"), (1.0, 0.1, "fedavg"), (1.0, 0.1, "fedhyper-g+cl")]
    bad, good = rows[1], rows[3]
    assert bad.gain == pytest.approx(12.0) and bad.speedup is None and bad.speedup_text == ">1.67x"
    assert good.gain == pytest.approx(-1.0) and good.speedup == pytest.approx(2.0)
    assert rows[0].gain is None  # FedAvg has no gain over itself
    s = fh.method_summary(rows, "fedhyper-g+cl")
    assert s["cells"] == 2 and s["mean_gain"] == pytest.approx(5.5)
    assert s["max_gain_cell"] == (0.5, 0.001) and s["min_gain_cell"] == (1.0, 0.1)
    assert (s["wins"], s["losses"], s["both_reached"], s["only_method"], s["only_baseline"]) == (1, 1, 1, 1, 0)
    assert s["median_speedup"] == pytest.approx(2.0)


def test_missing_runs_render_as_dashes():
    rows = fh.build_rows([(1.0, 0.01)], ["fedavg", "fedhyper-g"], {("fedhyper-g", 1.0, 0.01): _res(0.7, 3)})
    assert rows[1].gain is None and rows[1].speedup_text == "-"
    md = fh.table_md(rows, ["fedavg", "fedhyper-g"], {"fedavg": "FedAvg", "fedhyper-g": "G"}, 0.7)
    assert md.splitlines()[2] == "| 1 | 0.01 | - | - | 70.0 | 3 | - | - |"
    csv_text = fh.table_csv(rows)
    assert csv_text.splitlines()[0].startswith("global_lr,local_lr,method,final_accuracy")
    assert len(csv_text.splitlines()) == 3


def test_table_md_never():
    rows = fh.build_rows([(2.0, 0.001)], ["fedavg", "fedhyper-g"],
                         {("fedavg", 2.0, 0.001): _res(0.6, 10), ("fedhyper-g", 2.0, 0.001): _res(0.55, None)})
    line = fh.table_md(rows, ["fedavg", "fedhyper-g"], {}, 0.6).splitlines()[2]
    assert line == "| 2 | 0.001 | 60.0 | 10 | 55.0 | never | -5.0 | never |"


# ------------------------------------------------------------------ subset selection
@pytest.mark.parametrize("k, expected", [(1, [2]), (2, [0, 4]), (3, [0, 2, 4]), (4, [0, 1, 3, 4]),
                                         (5, [0, 1, 2, 3, 4]), (9, [0, 1, 2, 3, 4])])
def test_subset_indices(k, expected):
    assert fh.subset_indices(5, k) == expected


def test_subset_indices_rejects_zero():
    with pytest.raises(ValueError):
        fh.subset_indices(5, 0)


def test_select_cells_subset_3_is_corners_and_centre(grid):
    g, l = grid["axes"]["global_lr"]["values"], grid["axes"]["local_lr"]["values"]
    assert g == [0.5, 0.75, 1.0, 1.5, 2.0] and l == [0.001, 0.005, 0.01, 0.05, 0.1]
    cells = fh.select_cells(g, l, 3)
    assert cells == [(a, b) for a in (0.5, 1.0, 2.0) for b in (0.001, 0.01, 0.1)]
    assert len(fh.select_cells(g, l, None)) == 25


# ------------------------------------------------------------------ grid file -> scenarios
def test_grid_methods_and_axis_keys(grid):
    assert set(grid["methods"]) == {"fedavg", "fedhyper-g", "fedhyper-sl", "fedhyper-cl", "fedhyper-g+cl"}
    assert fh.axis_key(grid, "global_lr", "fedavg") == "strategy.server_lr"
    assert fh.axis_key(grid, "global_lr", "fedhyper-g+cl") == "lr_schedule.alpha0"
    assert fh.axis_key(grid, "local_lr", "fedhyper-sl") == "federation.local.lr"
    for ds in grid["datasets"].values():
        assert (ROOT / ds["scenario"]).exists() and 0 < ds["target"] < 1


@pytest.mark.parametrize("dataset", ["fmnist", "shakespeare"])
@pytest.mark.parametrize("method", ["fedavg", "fedhyper-g", "fedhyper-sl", "fedhyper-cl", "fedhyper-g+cl"])
def test_every_method_gives_a_valid_scenario(grid, dataset, method):
    for g, l in [(0.5, 0.001), (2.0, 0.1)]:
        scn = fh.load_run(grid, dataset, method, g, l, rounds=3, engine="workers", extra=["federation.eval_every=2"])
        assert scn.federation.local.lr == pytest.approx(l)
        assert scn.federation.rounds == 3 and scn.engine.kind == "workers" and scn.federation.eval_every == 2
        if method == "fedavg":
            assert scn.lr_schedule is None and scn.strategy.name == "fedavg"
            assert scn.strategy.server_lr == pytest.approx(g)
        else:
            assert scn.lr_schedule.kind == "fedhyper"
            assert scn.lr_schedule.variant == method.removeprefix("fedhyper-")
            assert scn.lr_schedule.alpha0 == pytest.approx(g)
            assert scn.strategy.server_lr == pytest.approx(1.0)  # not the axis for FedHyper


def test_base_scenarios_match_the_issue(grid):
    from fedsim.scenario import load_scenario

    fm = load_scenario(ROOT / grid["datasets"]["fmnist"]["scenario"])
    assert fm.data.dataset == "fashion_mnist" and fm.data.partition.kind == "dirichlet"
    assert fm.data.partition.num_clients == 100 and fm.data.partition.alpha == 0.5
    assert fm.federation.clients_per_round == 10 and fm.model.name == "cnn"
    assert fm.federation.local.optimizer == "sgd"
    sh = load_scenario(ROOT / grid["datasets"]["shakespeare"]["scenario"])
    assert sh.data.partition.kind == "natural" and sh.model.name == "char_lstm"
    assert sh.data.options["max_roles"] and sh.data.options["max_samples_per_role"]


def test_cell_dirname_and_overrides(grid):
    assert fh.cell_dirname(0.75, 0.005) == "g0.75_l0.005"
    ov = fh.run_overrides(grid, "fedhyper-g", 1.5, 0.05, rounds=10)
    assert ov[-3:] == ["lr_schedule.alpha0=1.5", "federation.local.lr=0.05", "federation.rounds=10"]
    assert not any(math.isnan(float(o.split("=")[1])) for o in ov[-3:])
