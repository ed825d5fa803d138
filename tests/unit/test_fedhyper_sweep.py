"""The FedHyper robustness grid (benchmarks/papers/fedhyper.py over fedsim.sweep): the grid files give the
runs of the paper's setup, the per-method summary, and the adoption of runs kept in the harness's earlier
layout. The table maths moved to fedsim.sweep.tables (tests/unit/test_sweep.py); no training here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedsim.sweep import CellResult, build_rows, load_grid, select_cells
from fedsim.sweep.tables import compare_md

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "papers" / "fedhyper.py"
METHODS = ["fedavg", "fedhyper-g", "fedhyper-sl", "fedhyper-cl", "fedhyper-g+cl"]


def _load_module():
    spec = importlib.util.spec_from_file_location("fedhyper_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


fh = _load_module()


@pytest.fixture(scope="module", params=["fmnist", "shakespeare"])
def grid(request):
    return load_grid(fh.GRIDS[request.param], extra=["federation.rounds=3", "engine.kind=workers",
                                                     "federation.eval_every=2"])


# ------------------------------------------------------------------ grid files -> scenarios
def test_grid_methods_axes_and_labels(grid):
    assert grid.method_names == METHODS and grid.baseline == "fedavg"
    assert [a.name for a in grid.axes] == ["global_lr", "local_lr"] and grid.combine == "product"
    g, l = grid.axes
    assert g.values == (0.5, 0.75, 1.0, 1.5, 2.0) and l.values == (0.001, 0.005, 0.01, 0.05, 0.1)
    assert g.key_for("fedavg") == "strategy.server_lr" and g.key_for("fedhyper-g+cl") == "lr_schedule.alpha0"
    assert l.key_for("fedhyper-sl") == "federation.local.lr"
    assert (g.label, l.label) == ("global LR", "local LR")          # RESULTS.md's table headers
    assert [grid.label(m) for m in METHODS] == ["FedAvg", "G", "SL", "CL", "G+CL"]
    assert grid.seeds == (0,) and 0 < grid.target < 1 and grid.scenario.is_file()


def test_every_method_gives_a_valid_scenario(grid):
    from fedsim.scenario import load_scenario

    for c in select_cells(grid, subset=2):                          # the four corners, every method
        scn = load_scenario(grid.scenario, c.overrides)
        g, l = c.values["global_lr"], c.values["local_lr"]
        assert scn.federation.local.lr == pytest.approx(l) and scn.seed == 0
        assert scn.federation.rounds == 3 and scn.engine.kind == "workers" and scn.federation.eval_every == 2
        if c.method == "fedavg":
            assert scn.lr_schedule is None and scn.strategy.name == "fedavg"
            assert scn.strategy.server_lr == pytest.approx(g)
        else:
            assert scn.lr_schedule.kind == "fedhyper"
            assert scn.lr_schedule.variant == c.method.removeprefix("fedhyper-")
            assert scn.lr_schedule.alpha0 == pytest.approx(g)
            assert scn.strategy.server_lr == pytest.approx(1.0)  # not the axis for FedHyper


def test_subset_3_is_corners_and_centre(grid):
    cells = select_cells(grid, subset=3, methods=["fedhyper-g"])
    assert [(c.values["global_lr"], c.values["local_lr"]) for c in cells if c.method == "fedavg"] == [
        (a, b) for a in (0.5, 1.0, 2.0) for b in (0.001, 0.01, 0.1)]
    assert [c.method for c in cells[:2]] == ["fedavg", "fedhyper-g"]   # FedAvg added: gains need it
    assert len(grid.cells()) == 125


def test_cell_overrides_match_the_earlier_harness(grid):
    """The earlier harness applied: method overrides, the global then the local LR (repr), rounds, engine,
    --set. Same scenario => same config hash => runs on disk from it are recognised as done."""
    c = next(c for c in grid.cells() if c.id == "fedhyper-g__global_lr=1.5__local_lr=0.05__seed=0")
    assert c.overrides == ("strategy.name=fedavg", "lr_schedule.kind=fedhyper", "lr_schedule.variant=g",
                           "lr_schedule.alpha0=1.5", "federation.local.lr=0.05", "seed=0", "federation.rounds=3",
                           "engine.kind=workers", "federation.eval_every=2")


def test_base_scenarios_match_the_issue():
    from fedsim.scenario import load_scenario

    fm = load_scenario(load_grid(fh.GRIDS["fmnist"]).scenario)
    assert fm.data.dataset == "fashion_mnist" and fm.data.partition.kind == "dirichlet"
    assert fm.data.partition.num_clients == 100 and fm.data.partition.alpha == 0.5
    assert fm.federation.clients_per_round == 10 and fm.model.name == "cnn"
    assert fm.federation.local.optimizer == "sgd" and fm.seed == 0
    sh = load_scenario(load_grid(fh.GRIDS["shakespeare"]).scenario)
    assert sh.data.partition.kind == "natural" and sh.model.name == "char_lstm" and sh.seed == 0
    assert sh.data.options["max_roles"] and sh.data.options["max_samples_per_role"]


# ------------------------------------------------------------------ per-method summary
def _res(acc, rtt, rounds=15):
    return CellResult(final_accuracy=acc, best_accuracy=acc, rounds=rounds, rounds_to_target=rtt)


def _rows(figures):
    grid = load_grid(fh.GRIDS["fmnist"])
    cells = [c for c in grid.cells(methods=["fedavg", "fedhyper-g+cl"])
             if (c.values["global_lr"], c.values["local_lr"]) in {(0.5, 0.001), (1.0, 0.1)}]
    results = {c.id: _res(*figures[(c.method, c.values["global_lr"], c.values["local_lr"])]) for c in cells}
    return grid, build_rows(cells, results, {c.id: "done" for c in cells}, "fedavg")


def test_method_summary_and_compare_table():
    grid, rows = _rows({("fedavg", 0.5, 0.001): (0.50, None), ("fedhyper-g+cl", 0.5, 0.001): (0.62, 9),
                        ("fedavg", 1.0, 0.1): (0.80, 6), ("fedhyper-g+cl", 1.0, 0.1): (0.79, 3)})
    bad, good = rows[1], rows[3]
    assert bad.gain == pytest.approx(12.0) and bad.speedup is None and bad.speedup_text == ">1.67x"
    assert good.gain == pytest.approx(-1.0) and good.speedup == pytest.approx(2.0)
    assert rows[0].gain is None  # FedAvg has no gain over itself
    s = fh.method_summary(rows, "fedhyper-g+cl")
    assert s["cells"] == 2 and s["mean_gain"] == pytest.approx(5.5)
    assert s["max_gain_cell"] == (0.5, 0.001) and s["min_gain_cell"] == (1.0, 0.1)
    assert (s["wins"], s["losses"], s["both_reached"], s["only_method"], s["only_baseline"]) == (1, 1, 1, 1, 0)
    assert s["median_speedup"] == pytest.approx(2.0)
    assert compare_md(rows, grid).splitlines()[2:] == [
        "| 0.5 | 0.001 | 50.0 | never | 62.0 | 9 | +12.0 | >1.67x |",
        "| 1 | 0.1 | 80.0 | 6 | 79.0 | 3 | -1.0 | 2.00x |"]
    md = fh.summary_md(rows, ["fedavg", "fedhyper-g+cl"], {"fedhyper-g+cl": "G+CL"}, dataset="fmnist",
                       baseline="fedavg", target=0.7, rounds=15, command="c", wall_s=60, missing=0)
    assert "| G+CL | 2 | +5.5 | +12.0 (0.5/0.001) | -1.0 (1/0.1) | 1/1 | 2.00x [2.00, 2.00] (n=1) | 1 / 0 |" in md
    assert "FedAvg final accuracy across the cells: 50.0–80.0 %." in md


# ------------------------------------------------------------------ the earlier layout
def test_finished_runs_of_the_earlier_layout_are_moved_into_cells(tmp_path):
    grid = load_grid(fh.GRIDS["fmnist"])
    done = fh.legacy_dir(tmp_path, "fedavg", 0.5, 0.001)
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"config_sha256": "x"}))
    unfinished = fh.legacy_dir(tmp_path, "fedhyper-g", 2.0, 0.1)
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text("")
    taken = fh.legacy_dir(tmp_path, "fedhyper-g", 1.0, 0.01)        # its cell already has a folder
    taken.mkdir(parents=True)
    (taken / "summary.json").write_text("{}")
    (tmp_path / "cells" / "fedhyper-g__global_lr=1__local_lr=0.01__seed=0").mkdir(parents=True)
    assert done.name == "g0.5_l0.001"
    assert fh.adopt_legacy_runs(tmp_path, grid.cells()) == 1
    assert (tmp_path / "cells" / "fedavg__global_lr=0.5__local_lr=0.001__seed=0" / "summary.json").is_file()
    assert not done.exists() and not (tmp_path / "runs" / "fedavg").exists()
    assert unfinished.exists() and taken.exists()                   # never moved: re-run / kept as found


def test_unknown_dataset_exits_2(capsys):
    assert fh.main(["--dataset", "cifar"]) == 2
    assert "unknown dataset 'cifar'" in capsys.readouterr().err
