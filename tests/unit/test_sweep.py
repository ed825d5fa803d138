"""fedsim.sweep without training: the grid file (every problem listed with its path), product vs zip, seeds,
cell ids, selection, validation of every cell before any runs, resumability, the time budget, failures,
and the table maths. ``fedsim.engine.run_scenario`` is replaced by a fake that writes a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main as cli_main
from fedsim.sweep import (
    GridError,
    Reporter,
    load_grid,
    parse_grid,
    run_sweep,
    select_cells,
)
from fedsim.sweep.grid import override_text, value_text
from fedsim.sweep.tables import (
    CellResult,
    build_rows,
    cells_csv,
    cells_md,
    compare_md,
    fmt_rounds,
    gain_points,
    heat_values,
    mean_std,
    seed_groups,
    seeds_csv,
    speedup,
)

BASE = """\
name: tiny
seed: 3
data:
  dataset: digits
  partition: {kind: dirichlet, num_clients: 6, alpha: 0.5, min_size: 5}
model: {name: mlp, options: {hidden: [16]}}
federation:
  rounds: 3
  clients_per_round: 3
  local: {steps: 3, batch_size: 16, lr: 0.1}
engine: {kind: inprocess}
"""

GRID = """\
scenario: base.yaml
seeds: [0, 1]
target: 0.5
axes:
  lr: {key: federation.local.lr, label: local LR, values: [0.05, 0.2]}
  federation.rounds: [2, 4]
methods:
  fedavg: {label: FedAvg, overrides: [strategy.name=fedavg]}
  prox: {label: FedProx, overrides: [strategy.name=fedprox, strategy.proximal_mu=0.01]}
baseline: fedavg
"""


def _write(tmp_path: Path, grid: str = GRID, base: str = BASE) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "grid.yaml").write_text(grid)
    return tmp_path / "grid.yaml"


class Quiet(Reporter):
    def __init__(self):
        self.lines: list[str] = []

    def progress(self, text: str) -> None:
        self.lines.append(text)

    def result(self, text: str) -> None:
        self.lines.append(text)


class FakeEngine:
    """Stands in for fedsim.engine.run_scenario: writes summary.json/metrics.jsonl like a real run (accuracy
    grows with the local LR and the round; FedProx 1 point better) and counts the calls."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail_on = fail_on

    def __call__(self, scn, out_dir, *, progress="auto", resume=False, force=False):
        from fedsim.errors import RunError
        from fedsim.results import write_json
        from fedsim.scenario import config_sha256, to_yaml

        out_dir = Path(out_dir)
        assert progress == "none"
        self.calls.append((out_dir.name, resume))
        if self.fail_on and self.fail_on in out_dir.name:
            out_dir.mkdir(parents=True, exist_ok=True)
            raise RunError("no client reply was accepted in any round")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(scn))
        bonus = 0.01 if scn.strategy.name == "fedprox" else 0.0
        rows = [{"round": r, "eval_accuracy": min(1.0, scn.federation.local.lr * r + bonus + 0.001 * scn.seed),
                 "lr_global": 1.0 + r} for r in range(1, scn.federation.rounds + 1)]
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        accs = [r["eval_accuracy"] for r in rows]
        write_json(out_dir / "summary.json", {
            "name": scn.name, "final_accuracy": accs[-1], "best_accuracy": max(accs),
            "best_round": accs.index(max(accs)) + 1, "rounds_completed": len(rows), "wall_s": 1.5,
            "config_sha256": config_sha256(scn), "engine": "inprocess"})
        return {}


@pytest.fixture
def engine(monkeypatch):
    fake = FakeEngine()
    monkeypatch.setattr("fedsim.engine.run_scenario", fake)
    return fake


# ------------------------------------------------------------------ grid file
def test_every_grid_problem_is_listed_with_its_path(tmp_path):
    path = _write(tmp_path, """\
scenario: nothere.yaml
seeds: [0, -1, x, 0]
combine: prodct
target: 2
axess: {}
axes:
  lr: {key: federation.local.lr, values: [0.1, 0.1]}
  g: {keys: {fedavgg: strategy.server_lr}, values: []}
  h: 3
  s: {key: seed, values: [1]}
methods:
  fedavg: {label: FedAvg, overrides: [strategy.name]}
  bad name: [x=1]
baseline: fedprox
overrides: [seed=3]
""")
    with pytest.raises(GridError) as info:
        load_grid(path, extra=["nokey"])
    paths = sorted(p.split(":")[0] for p in info.value.problems)
    assert paths == sorted([
        "axess", "scenario", "methods.fedavg.overrides[0]", "methods.bad name", "axes.lr.values",
        "axes.g.keys.fedavgg", "axes.g.keys", "axes.g.values", "axes.h", "axes.s.key", "combine", "baseline",
        "overrides[0]", "--set nokey", "target", "seeds[1]", "seeds[2]", "seeds"])
    text = str(info.value)
    assert text.startswith(f"{path}: 18 problem(s) in the sweep grid")
    assert "did you mean 'axes'?" in text and "did you mean 'fedavg'?" in text
    assert "relative to the grid file's folder" in text


def test_cli_exit_2_without_traceback_for_a_bad_grid(tmp_path, capsys):
    path = _write(tmp_path, "scenario: base.yaml\naxes: {lr: {values: [1]}}\n")
    assert cli_main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "axes.lr: give either key" in err and "Traceback" not in err


@pytest.mark.parametrize("text, expected", [
    ("axes: [\n", "YAML syntax error"),
    ("- a\n- b\n", "must be a mapping"),
    ("scenario: !!python/object:os.system {}\n", "unsupported YAML tag"),       # safe_load only
])
def test_unreadable_grid_files(tmp_path, text, expected):
    with pytest.raises(GridError, match=expected):
        load_grid(_write(tmp_path, text))


def test_cell_overrides_in_application_order(tmp_path):
    grid = load_grid(_write(tmp_path, GRID.replace("baseline: fedavg", "baseline: fedavg\noverrides: [a.b=1]")),
                     extra=["federation.eval_every=2"])
    cell = grid.cells()[1]
    assert cell.id == "prox__lr=0.05__federation.rounds=2__seed=0"
    assert cell.overrides == ("a.b=1", "strategy.name=fedprox", "strategy.proximal_mu=0.01",
                              "federation.local.lr=0.05", "federation.rounds=2", "seed=0", "federation.eval_every=2")
    assert cell.own == cell.overrides[1:-1]
    assert grid.scenario == tmp_path / "base.yaml"           # relative to the grid file, not the cwd


def test_product_order_seeds_outermost_methods_innermost(tmp_path):
    cells = load_grid(_write(tmp_path)).cells()
    assert len(cells) == 2 * 2 * 2 * 2
    assert [(c.seed, c.values["lr"], c.values["federation.rounds"], c.method) for c in cells[:5]] == [
        (0, 0.05, 2, "fedavg"), (0, 0.05, 2, "prox"), (0, 0.05, 4, "fedavg"), (0, 0.05, 4, "prox"),
        (0, 0.2, 2, "fedavg")]
    assert {c.seed for c in cells[8:]} == {1}


def test_zip_pairs_the_i_th_values(tmp_path):
    grid = load_grid(_write(tmp_path, GRID.replace("seeds: [0, 1]", "seeds: [0]\ncombine: zip")))
    assert [(c.values["lr"], c.values["federation.rounds"]) for c in grid.cells() if c.method == "fedavg"] == [
        (0.05, 2), (0.2, 4)]
    with pytest.raises(GridError, match=r"combine: zip needs axes of equal length \(lr: 2, federation.rounds: 3\)"):
        load_grid(_write(tmp_path, GRID.replace("[2, 4]", "[2, 4, 6]") + "combine: zip\n"))


def test_seeds_default_to_the_base_scenarios_seed(tmp_path):
    grid = load_grid(_write(tmp_path, "scenario: base.yaml\naxes: {federation.local.lr: [0.1]}\n"))
    assert grid.seeds == (3,) and grid.cells()[0].overrides[-1] == "seed=3"


def test_cell_ids_are_stable_when_values_are_added_or_reordered(tmp_path):
    before = {c.id: c.overrides for c in load_grid(_write(tmp_path)).cells()}
    grown = GRID.replace("values: [0.05, 0.2]", "values: [0.2, 0.1, 0.05]").replace("seeds: [0, 1]", "seeds: [1, 0, 2]")
    after = {c.id: c.overrides for c in load_grid(_write(tmp_path, grown)).cells()}
    assert before.items() <= after.items() and len(after) == 3 * 2 * 2 * 3


def test_values_that_print_alike_are_refused(tmp_path):
    with pytest.raises(GridError, match="appears more than once"):
        load_grid(_write(tmp_path, "scenario: base.yaml\naxes: {federation.local.lr: [1, 1.0]}\n"))


def test_override_text_round_trips_through_yaml():
    for value in (1e-05, 0.001, 2.0, 3, True, "1e-3", "sgd", [16, 32], "a b"):
        text = f"k={override_text(value)}".partition("=")[2]
        assert yaml.safe_load(text) == value, (value, text)
    assert value_text(1e-05) == "1e-05" and value_text(2.0) == "2" and value_text([16, 32]) == "[16,32]"


def test_per_method_axis_keys(tmp_path):
    grid = load_grid(_write(tmp_path, GRID.replace(
        "lr: {key: federation.local.lr, label: local LR, values: [0.05, 0.2]}",
        "lr: {keys: {prox: strategy.proximal_mu, default: federation.local.lr}, values: [0.05, 0.2]}")))
    by = {c.method: c for c in grid.cells()[:2]}
    assert "federation.local.lr=0.05" in by["fedavg"].own and "strategy.proximal_mu=0.05" in by["prox"].own


def test_selection_methods_subset_only(tmp_path):
    grid = load_grid(_write(tmp_path, GRID.replace("[2, 4]", "[1, 2, 3]")))
    assert {c.method for c in select_cells(grid, methods=["prox"])} == {"fedavg", "prox"}   # baseline added
    assert select_cells(grid, methods=["prox", "fedavg"])[0].method == "prox"              # given order
    sub = select_cells(grid, subset=1)
    assert {(c.values["lr"], c.values["federation.rounds"]) for c in sub} == {(0.05, 2)}     # middle of each axis
    only = select_cells(grid, only=["fedavg__*seed=1", "*rounds=3__seed=0"])
    assert {c.id for c in only} == {c.id for c in grid.cells()
                                    if (c.method == "fedavg" and c.seed == 1) or c.id.endswith("rounds=3__seed=0")}
    with pytest.raises(GridError) as info:
        select_cells(grid, only=["nope*"], methods=None)
    assert "--only nope*: matches no cell" in str(info.value)
    with pytest.raises(GridError, match="--methods: unknown fedsgd"):
        select_cells(grid, methods=["fedsgd"])


# ------------------------------------------------------------------ validation before running
def test_a_bad_cell_anywhere_stops_the_sweep_before_any_cell_runs(tmp_path, engine):
    """The typo-in-cell-17 bug: the last cell's scenario is invalid, so nothing may train."""
    path = _write(tmp_path, GRID.replace("[2, 4]", "[2, 0]"))
    with pytest.raises(GridError) as info:
        run_sweep(load_grid(path), out=tmp_path / "out", reporter=Quiet())
    assert engine.calls == [] and not (tmp_path / "out").exists()
    assert "federation.rounds: must be > 0 (got 0)" in str(info.value) and "(in 8 cells:" in str(info.value)


def test_unselected_cells_are_validated_too(tmp_path, engine):
    path = _write(tmp_path, GRID.replace("strategy.proximal_mu=0.01", "strategy.proximal_mu=-1"))
    with pytest.raises(GridError, match="proximal_mu"):
        run_sweep(load_grid(path), out=tmp_path / "out", methods=["fedavg"], reporter=Quiet())
    assert engine.calls == []


def test_two_cells_with_the_same_scenario_are_refused(tmp_path, engine):
    path = _write(tmp_path, GRID)
    with pytest.raises(GridError, match="give the same scenario"):
        run_sweep(load_grid(path, extra=["federation.rounds=5"]), out=tmp_path / "out", reporter=Quiet())


def test_dry_run_lists_and_writes_nothing(tmp_path, engine):
    say = Quiet()
    outcome = run_sweep(load_grid(_write(tmp_path)), out=tmp_path / "out", dry_run=True, reporter=say)
    assert outcome.exit_code == 0 and engine.calls == [] and not (tmp_path / "out").exists()
    assert sum(line.startswith("[") for line in say.lines) == 16 and say.lines[-1].strip() == "16 new"


# ------------------------------------------------------------------ resumability
def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}


def test_a_finished_cell_is_never_re_run(tmp_path, engine):
    grid, out = load_grid(_write(tmp_path)), tmp_path / "out"
    first = run_sweep(grid, out=out, reporter=Quiet())
    assert first.exit_code == 0 and first.complete and len(engine.calls) == 16
    stamps = _mtimes(out)
    second = run_sweep(grid, out=out, reporter=Quiet())
    assert len(engine.calls) == 16 and second.ran == 0 and second.complete
    assert _mtimes(out) == stamps
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["complete"] and sweep["counts"]["done"] == 16
    cell = sweep["cells"][1]
    assert cell["id"] == "prox__lr=0.05__federation.rounds=2__seed=0" and cell["status"] == "done"
    assert cell["seed"] == 0 and cell["axes"] == {"lr": 0.05, "federation.rounds": 2} and cell["rounds"] == 2
    assert cell["overrides"][-1] == "seed=0" and len(cell["config_sha256"]) == 64
    assert cell["gain_pts"] == pytest.approx(1.0) and cell["final_accuracy"] == pytest.approx(0.11)


def test_an_unfinished_cell_is_started_over_in_its_own_folder(tmp_path, engine):
    grid, out = load_grid(_write(tmp_path)), tmp_path / "out"
    run_sweep(grid, out=out, reporter=Quiet())
    victim = out / "cells" / "fedavg__lr=0.2__federation.rounds=4__seed=1"
    (victim / "summary.json").unlink()                      # interrupted before the end
    (victim / "leftover.txt").write_text("from the crashed run")
    others = {k: v for k, v in _mtimes(out).items() if k != victim.name}
    run_sweep(grid, out=out, reporter=Quiet())
    assert engine.calls[16:] == [(victim.name, False)]
    assert not (victim / "leftover.txt").exists() and (victim / "summary.json").is_file()
    assert {k: v for k, v in _mtimes(out).items() if k != victim.name} == others


def test_an_unfinished_cell_with_checkpoints_is_resumed(tmp_path, engine, monkeypatch):
    from fedsim.errors import ResumeError

    grid, out = load_grid(_write(tmp_path)), tmp_path / "out"
    run_sweep(grid, out=out, only=["fedavg__lr=0.05__federation.rounds=2__seed=0"], reporter=Quiet())
    cell = out / "cells" / "fedavg__lr=0.05__federation.rounds=2__seed=0"
    (cell / "summary.json").unlink()
    (cell / "checkpoints").mkdir()
    (cell / "checkpoints" / "round_1.safetensors").write_bytes(b"x")
    run_sweep(grid, out=out, only=[cell.name], reporter=Quiet())
    assert engine.calls[-1] == (cell.name, True)

    (cell / "summary.json").unlink()                        # the engine refuses: start over, cleared
    real = engine.__call__

    def refusing(scn, out_dir, *, progress="auto", resume=False, force=False):
        if resume:
            engine.calls.append((Path(out_dir).name, True))
            raise ResumeError("cannot resume: this run's setup differs")
        return real(scn, out_dir, progress=progress)
    monkeypatch.setattr("fedsim.engine.run_scenario", refusing)
    say = Quiet()
    run_sweep(grid, out=out, only=[cell.name], reporter=say)
    assert engine.calls[-2:] == [(cell.name, True), (cell.name, False)]
    assert not (cell / "checkpoints").exists() and any("starting the cell over" in line for line in say.lines)


def test_a_finished_run_of_another_configuration_is_refused_unless_overwrite(tmp_path, engine):
    grid, out = load_grid(_write(tmp_path)), tmp_path / "out"
    run_sweep(grid, out=out, only=["fedavg__*seed=0"], reporter=Quiet())
    changed = load_grid(tmp_path / "grid.yaml", extra=["federation.local.steps=2"])
    with pytest.raises(GridError) as info:
        run_sweep(changed, out=out, only=["fedavg__*seed=0"], reporter=Quiet())
    assert len(info.value.problems) == 4 and "(federation.local.steps: 3 -> 2)" in info.value.problems[0]
    assert "--overwrite" in str(info.value) and len(engine.calls) == 4
    report = run_sweep(changed, out=out, only=["fedavg__*seed=0"], report_only=True, reporter=Quiet())
    assert {r.status for r in report.rows} == {"stale"} and len(engine.calls) == 4
    run_sweep(changed, out=out, only=["fedavg__*seed=0"], overwrite=True, reporter=Quiet())
    assert len(engine.calls) == 8


# ------------------------------------------------------------------ budget and failures
def test_budget_stops_starting_cells_and_exits_0(tmp_path, engine, monkeypatch):
    now = [0.0]
    real = engine.__call__

    def slow(scn, out_dir, **kw):          # every cell "takes" 10 minutes on the fake clock
        now[0] += 600
        return real(scn, out_dir, **kw)
    monkeypatch.setattr("fedsim.engine.run_scenario", slow)
    grid, out, say = load_grid(_write(tmp_path)), tmp_path / "out", Quiet()
    outcome = run_sweep(grid, out=out, budget_min=15, reporter=say, clock=lambda: now[0])
    assert outcome.exit_code == 0 and not outcome.complete and len(engine.calls) == 2
    note = next(line for line in say.lines if line.startswith("budget of 15 min spent"))
    assert "14 cell(s) not started" in note and "run the same command again" in note
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["complete"] is False and sweep["counts"] == {"done": 2, "failed": 0, "pending": 14, "stale": 0}
    assert "**incomplete**" in (out / "table.md").read_text()
    eta = next(line for line in say.lines if line.startswith("[2/16]"))
    assert "ETA 150.0 min for 15 cell(s)" in eta           # from the one finished cell: 10 min x 15
    again = run_sweep(grid, out=out, reporter=Quiet(), clock=lambda: now[0])
    assert again.complete and len(engine.calls) == 16


def test_a_failing_cell_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    fake = FakeEngine(fail_on="prox__lr=0.2__federation.rounds=4__seed=0")
    monkeypatch.setattr("fedsim.engine.run_scenario", fake)
    out = tmp_path / "out"
    outcome = run_sweep(load_grid(_write(tmp_path)), out=out, reporter=Quiet())
    assert outcome.exit_code == 1 and outcome.failed == 1 and len(fake.calls) == 16
    cells = {c["id"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    bad = cells["prox__lr=0.2__federation.rounds=4__seed=0"]
    assert bad["status"] == "failed" and "no client reply" in bad["note"]
    fake.fail_on = None
    assert run_sweep(load_grid(tmp_path / "grid.yaml"), out=out, reporter=Quiet()).complete
    assert fake.calls[-1] == (bad["id"], False)             # only the failed cell runs again


def test_outputs_of_a_two_axis_sweep(tmp_path, engine):
    out = tmp_path / "out"
    outcome = run_sweep(load_grid(_write(tmp_path, GRID + "metrics: [lr_global]\n")), out=out, reporter=Quiet())
    names = {p.name for p in outcome.files}
    assert {"sweep.json", "table.csv", "table.md", "table_seeds.csv", "compare.md", "heatmap_fedavg.png",
            "heatmap_prox.png", "gain_prox.png"} <= names and "gain_fedavg.png" not in names
    assert all((out / n).stat().st_size > 0 for n in names)
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["cell", "method", "lr", "federation.rounds"] and len(rows) == 17
    assert rows[0].endswith("final_lr_global") and rows[1].endswith(",3")     # last lr_global of 2 rounds


# ------------------------------------------------------------------ table maths
def test_gain_and_speedup():
    assert gain_points(0.80, 0.75) == pytest.approx(5.0) and gain_points(None, 0.7) is None
    assert speedup(12, 4, 15) == (3.0, "3.00x") and speedup(4, 8, 15) == (0.5, "0.50x")
    assert speedup(None, 5, 15) == (None, ">3.00x")           # the baseline would need more than 15 rounds
    assert speedup(5, None, 15) == (None, "never") and speedup(None, None, 15) == (None, "-")
    assert fmt_rounds(None) == "never" and fmt_rounds(7) == "7"


def test_mean_std():
    assert mean_std([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(0.1414, abs=1e-4))
    assert mean_std([0.5]) == (0.5, None) and mean_std([]) == (None, None)


def _grid(seeds="[0]", target=0.6, tmp_path=Path(".")):
    return parse_grid(f"scenario: s.yaml\nseeds: {seeds}\ntarget: {target}\naxes:\n"
                      "  g: {label: global LR, keys: {fedavg: strategy.server_lr, default: lr_schedule.alpha0}, "
                      "values: [1.0, 2.0]}\n  l: {label: local LR, key: federation.local.lr, values: [0.001, 0.01]}\n"
                      "methods: {fedavg: {label: FedAvg, overrides: [a=1]}, g: {label: G, overrides: [a=2]}}\n"
                      "baseline: fedavg\n", base_dir=tmp_path, check_files=False)


def _res(acc, rtt, rounds=15):
    return CellResult(final_accuracy=acc, best_accuracy=acc, rounds=rounds, rounds_to_target=rtt)


def _rows(grid, figures):
    cells = grid.cells()
    results = {c.id: _res(*figures[(c.method, c.values["g"], c.values["l"], c.seed)]) for c in cells
               if (c.method, c.values["g"], c.values["l"], c.seed) in figures}
    return build_rows(cells, results, {c.id: "done" if c.id in results else "pending" for c in cells}, "fedavg")


def test_compare_table_lines_as_in_results_md():
    """The FedHyper RESULTS.md format: missing runs as dashes, 'never' and '>x' speed-ups."""
    grid = _grid()
    rows = _rows(grid, {("g", 1.0, 0.01, 0): (0.7, 3), ("fedavg", 2.0, 0.001, 0): (0.6, 10),
                        ("g", 2.0, 0.001, 0): (0.55, None), ("fedavg", 1.0, 0.001, 0): (0.5, None),
                        ("g", 1.0, 0.001, 0): (0.62, 9)})
    lines = compare_md(rows, grid).splitlines()
    assert lines[0] == "| global LR | local LR | FedAvg acc % | FedAvg r@60% | G acc % | G r@60% | G gain pts | G speed-up |"
    assert lines[2] == "| 1 | 0.001 | 50.0 | never | 62.0 | 9 | +12.0 | >1.67x |"
    assert lines[3] == "| 1 | 0.01 | - | - | 70.0 | 3 | - | - |"
    assert lines[4] == "| 2 | 0.001 | 60.0 | 10 | 55.0 | never | -5.0 | never |"
    assert lines[5] == "| 2 | 0.01 | - | - | - | - | - | - |"


def test_gain_pairs_the_same_point_and_seed():
    grid = _grid(seeds="[0, 1]")
    rows = _rows(grid, {("fedavg", 1.0, 0.001, 0): (0.5, None), ("g", 1.0, 0.001, 0): (0.6, 4),
                        ("fedavg", 1.0, 0.001, 1): (0.7, 2), ("g", 1.0, 0.001, 1): (0.6, 4)})
    gains = {(r.cell.method, r.cell.seed): r.gain for r in rows if r.cell.values == {"g": 1.0, "l": 0.001}}
    assert gains[("g", 0)] == pytest.approx(10.0) and gains[("g", 1)] == pytest.approx(-10.0)
    assert gains[("fedavg", 0)] is None
    group = next(g for g in seed_groups(rows) if g.method == "g" and g.point == (("g", 1.0), ("l", 0.001)))
    assert group.stat("final_accuracy") == (pytest.approx(0.6), pytest.approx(0.0))
    assert group.stat("gain") == (pytest.approx(0.0), pytest.approx(14.142, abs=1e-3))
    assert group.reached() == (2, 2)
    line = compare_md(rows, grid).splitlines()[2]
    assert line == "| 1 | 0.001 | 60.0 ± 14.1 | 2 (1/2) | 60.0 ± 0.0 | 4 (2/2) | +0.0 ± 14.1 | 0.50x (n=1) |"
    seeds_rows = seeds_csv(seed_groups(rows), grid).splitlines()
    assert seeds_rows[2] == "g,1,0.001,2,2,0.6000,0.0000,0.6000,0.0000,0.00,14.14,2/2"
    md = cells_md(rows, grid)
    assert "Mean ± sample std over seeds" in md and "| G | 1 | 0.001 | 2/2 | 60.0 ± 0.0 |" in md


def test_cells_csv_and_heat_values():
    grid = _grid()
    rows = _rows(grid, {("fedavg", 1.0, 0.001, 0): (0.5, None), ("g", 1.0, 0.001, 0): (0.6, 4),
                        ("fedavg", 2.0, 0.01, 0): (0.8, 2)})
    csv_rows = cells_csv(rows, grid).splitlines()
    assert csv_rows[0] == ("cell,method,g,l,seed,status,final_accuracy,best_accuracy,best_round,rounds,"
                           "rounds_to_target,gain_pts,speedup,speedup_text,wall_s")
    assert csv_rows[2] == "g__g=1__l=0.001__seed=0,g,1,0.001,0,done,0.6000,0.6000,,15,4,10.00,,>3.75x,"
    assert csv_rows[3].startswith("fedavg__g=1__l=0.01__seed=0,fedavg,1,0.01,0,pending,")
    matrix, xs, ys = heat_values(rows, grid, "fedavg", "acc")
    assert xs == [1.0, 2.0] and ys == [0.001, 0.01]
    assert matrix == [[pytest.approx(50.0), None], [None, pytest.approx(80.0)]]
    assert heat_values(rows, grid, "g", "gain")[0] == [[pytest.approx(10.0), None], [None, None]]


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text file"),
    (b"scenario: a.yaml\nseeds: [0]\nseeds: [1]\n", "line 3: duplicate key 'seeds' at the top level"),
    (b"a: &a [1]\n" + b"".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}, *{'a' if i == 0 else f'b{i - 1}'}]\n".encode()
                               for i in range(30)), "alias bomb"),
])
def test_grid_files_are_read_like_scenarios(tmp_path, content, message):
    """A grid file gets the scenario reader's bounds: binary files, duplicate keys and alias bombs
    are GridErrors (one message, exit 2), not UnicodeDecodeError, a silent last-wins or a hang."""
    from fedsim.sweep.grid import GridError, load_grid

    path = tmp_path / "grid.yaml"
    path.write_bytes(content)
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert any(message in p for p in info.value.problems), info.value.problems
