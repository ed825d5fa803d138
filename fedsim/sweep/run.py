"""Running a sweep: validate every cell, find what is already on disk, run the rest one after another
in this process (``fedsim.engine.run_scenario``), and keep ``sweep.json`` and the tables up to date.

States of a selected cell before the sweep starts (``cells/<id>/`` under the sweep folder):
  * ``done``: ``summary.json`` with this cell's config hash -> never re-run.
  * ``stale``: ``summary.json`` with another config hash (the base scenario, the grid or ``--set``
    changed) -> refused before anything runs, unless ``overwrite`` (then re-run from scratch).
  * ``resume``: no ``summary.json`` but checkpoints (``output.checkpoint_every``) -> resumed from the
    latest intact one; if the engine refuses to resume, the folder is cleared and the cell starts over.
  * ``partial``: no ``summary.json``, no checkpoint -> the folder is cleared and the cell starts over.
  * ``new``: nothing there yet.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.sweep.grid import Cell, Grid, GridError, select_cells
from fedsim.sweep.tables import (
    CellResult,
    CellRow,
    build_rows,
    cells_csv,
    cells_md,
    compare_md,
    fmt_acc,
    fmt_rounds,
    read_result,
    seed_groups,
    seeds_csv,
)

__all__ = ["Planned", "Reporter", "SweepOutcome", "plan_cells", "run_sweep", "write_outputs"]

CELLS_DIR = "cells"
TO_RUN = ("new", "partial", "resume", "stale")


class Reporter:
    """Where a sweep talks: ``progress`` (cell k/N, ETA, notes) to stderr, ``result`` (one line per finished
    cell, the closing summary) to stdout."""

    def progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def result(self, text: str) -> None:
        print(text, flush=True)


@dataclass
class Planned:
    """A selected cell with its validated scenario, config hash, run directory and state on disk."""

    cell: Cell
    scenario: Any
    sha: str
    dir: Path
    state: str
    note: str = ""


@dataclass
class SweepOutcome:
    """What an invocation did: ``exit_code`` (0 ok or stopped by the budget, 1 a cell failed, 2 bad input
    found while running), whether every selected cell is done, and the files written."""

    exit_code: int
    complete: bool
    rows: list[CellRow] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    ran: int = 0
    failed: int = 0


# ----------------------------------------------------------------------------- planning
def _validate_all(grid: Grid) -> dict[str, tuple[Any, str]]:
    """Every cell of the grid (not only the selected ones) as a validated scenario and its config hash."""
    from fedsim.scenario import ScenarioError, config_sha256, load_scenario

    out: dict[str, tuple[Any, str]] = {}
    problems: dict[str, list[str]] = {}
    for cell in grid.cells():
        try:
            scn = load_scenario(grid.scenario, cell.overrides)
        except ScenarioError as exc:
            for p in exc.problems:
                problems.setdefault(p, []).append(cell.id)
            continue
        out[cell.id] = (scn, config_sha256(scn))
    lines = [_grouped(p, ids) for p, ids in problems.items()]
    by_sha: dict[str, list[str]] = {}
    for cid, (_, sha) in out.items():
        by_sha.setdefault(sha, []).append(cid)
    lines += [f"cells {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''} give the same scenario: an axis sets a "
              "key that the method's overrides or --set set again, or a key the method ignores"
              for ids in by_sha.values() if len(ids) > 1]
    if lines:
        raise GridError(str(grid.source), lines, f"in the cells' scenarios (base {grid.scenario} + each cell's "
                                                 "overrides); nothing was run")
    return out


def _grouped(problem: str, ids: list[str]) -> str:
    if len(ids) == 1:
        return f"cell {ids[0]}: {problem}"
    more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
    return f"{problem} (in {len(ids)} cells: {', '.join(ids[:3])}{more})"


def _state(run_dir: Path, sha: str, scenario: Any) -> tuple[str, str]:
    from fedsim.results import read_json

    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            found = read_json(summary).get("config_sha256")
        except (OSError, ValueError) as exc:
            return "partial", f"unreadable summary.json ({exc})"
        return ("done", "") if found == sha else ("stale", _config_change(run_dir, scenario))
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new", ""
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "resume", "an unfinished run with checkpoints"
    return "partial", "an unfinished run without checkpoints"


def _config_change(run_dir: Path, scenario: Any) -> str:
    """What differs between the finished run's config.yaml and the cell's scenario now."""
    from fedsim.scenario import ScenarioError, config_diff, load_scenario, result_config

    try:
        old = load_scenario(run_dir / "config.yaml")
    except ScenarioError:
        return "its config_sha256 differs from this cell's"
    diff = config_diff(result_config(old), result_config(scenario))
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    return shown or "its config_sha256 differs from this cell's"


def plan_cells(grid: Grid, cells: Sequence[Cell], out: Path, *, overwrite: bool = False,
               report_only: bool = False) -> list[Planned]:
    """Validate every cell of the grid and find each selected cell's state on disk.

    Raises:
        GridError: any cell's scenario is invalid (each problem once, with the cells it concerns), two cells
            are the same scenario, or a selected cell's folder holds a finished run of another configuration
            (unless ``overwrite``; reported, not refused, with ``report_only``).
    """
    scenarios = _validate_all(grid)
    plans = []
    for cell in cells:
        scn, sha = scenarios[cell.id]
        run_dir = out / CELLS_DIR / cell.id
        state, note = _state(run_dir, sha, scn)
        plans.append(Planned(cell, scn, sha, run_dir, state, note))
    stale = [p for p in plans if p.state == "stale"]
    if stale and not (overwrite or report_only):
        raise GridError(str(grid.source), [f"{p.dir}: holds a finished run of another configuration ({p.note})"
                                           for p in stale],
                        "with the runs on disk: pass --overwrite to re-run these cells, or choose another --out; "
                        "nothing was run")
    return plans


# ----------------------------------------------------------------------------- outputs
def _results(plans: Sequence[Planned], grid: Grid, statuses: dict[str, str]) -> dict[str, CellResult]:
    return {p.cell.id: read_result(p.dir, grid.target, grid.metrics) for p in plans if statuses[p.cell.id] == "done"}


def _sweep_json(grid: Grid, out: Path, plans: Sequence[Planned], rows: Sequence[CellRow], statuses: dict[str, str],
                notes: dict[str, str], complete: bool) -> dict:
    import fedsim

    cells = []
    for p, r in zip(plans, rows):
        res = r.result
        entry: dict[str, Any] = {
            "id": p.cell.id, "method": p.cell.method, "axes": dict(p.cell.point), "seed": p.cell.seed,
            "overrides": list(p.cell.overrides), "dir": str(p.dir.relative_to(out)), "config_sha256": p.sha,
            "status": statuses[p.cell.id]}
        if res is not None:
            entry.update(final_accuracy=res.final_accuracy, best_accuracy=res.best_accuracy, best_round=res.best_round,
                         rounds=res.rounds, wall_s=res.wall_s)
            if grid.target is not None:
                entry["rounds_to_target"] = res.rounds_to_target
            if grid.baseline is not None and p.cell.method != grid.baseline:
                entry.update(gain_pts=r.gain, speedup=r.speedup, speedup_text=r.speedup_text)
            if grid.metrics:
                entry["metrics"] = res.metrics
        if notes.get(p.cell.id):
            entry["note"] = notes[p.cell.id]
        cells.append(entry)
    return {"name": grid.name, "grid": str(grid.source.resolve()), "scenario": str(grid.scenario.resolve()),
            "combine": grid.combine, "axes": {a.name: {"keys": a.keys, "values": list(a.values)} for a in grid.axes},
            "methods": {m.name: list(m.overrides) for m in grid.methods}, "baseline": grid.baseline,
            "seeds": list(grid.seeds), "target": grid.target, "overrides": list(grid.overrides),
            "set": list(grid.extra), "complete": complete,
            "counts": {s: sum(v == s for v in statuses.values()) for s in ("done", "failed", "pending", "stale")},
            "fedsim_version": fedsim.__version__,
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cells": cells}


def write_outputs(grid: Grid, out: Path, plans: Sequence[Planned], statuses: dict[str, str], notes: dict[str, str],
                  *, final: bool) -> tuple[list[CellRow], list[Path]]:
    """``sweep.json``, ``table.csv``, ``table.md`` (+ ``table_seeds.csv`` with several seeds, ``compare.md`` with
    methods); with ``final`` also the heatmaps and ``curves.png``. Every file is written atomically."""
    from fedsim.results import write_json
    from fedsim.runtime.files import atomic_write_text

    rows = build_rows([p.cell for p in plans], _results(plans, grid, statuses), statuses, grid.baseline)
    complete = all(s == "done" for s in statuses.values())
    write_json(out / "sweep.json", _sweep_json(grid, out, plans, rows, statuses, notes, complete))
    files = [out / "sweep.json", out / "table.csv", out / "table.md"]
    atomic_write_text(out / "table.csv", cells_csv(rows, grid))
    atomic_write_text(out / "table.md", _table_md(grid, rows, statuses, complete))
    if len(grid.seeds) > 1:
        atomic_write_text(out / "table_seeds.csv", seeds_csv(seed_groups(rows), grid))
        files.append(out / "table_seeds.csv")
    if len({p.cell.method for p in plans} - {None}) > 1:
        atomic_write_text(out / "compare.md", compare_md(rows, grid))
        files.append(out / "compare.md")
    if final:
        files += _plots(grid, out, plans, rows, statuses)
    return rows, files


def _plots(grid: Grid, out: Path, plans: Sequence[Planned], rows: Sequence[CellRow],
           statuses: dict[str, str]) -> list[Path]:
    from fedsim.results import plot_comparison
    from fedsim.sweep.heatmaps import write_heatmaps

    files = write_heatmaps(out, rows, grid)
    done: list[str | Path] = [p.dir for p in plans if statuses[p.cell.id] == "done"]
    if 2 <= len(done) <= 12:           # more lines than that make an unreadable legend
        files.append(plot_comparison(done, out / "curves.png"))
    return files


def _table_md(grid: Grid, rows: Sequence[CellRow], statuses: dict[str, str], complete: bool) -> str:
    done = sum(s == "done" for s in statuses.values())
    head = [f"# Sweep {grid.name}: {done} of {len(statuses)} cells done", "",
            f"- grid: `{grid.source}`; base scenario: `{grid.scenario}`; {grid.combine} of "
            f"{', '.join(a.name for a in grid.axes)}; seeds {', '.join(map(str, grid.seeds))}"
            + (f"; target accuracy {100 * grid.target:g} %" if grid.target is not None else ""),
            f"- every cell also sets: {' '.join(grid.overrides + grid.extra) or '(nothing)'}"]
    if not complete:
        head.append("- **incomplete**: run the same `fedsim sweep` command again to run the cells not done "
                    "(finished cells are kept)")
    if grid.baseline:
        head.append(f"- gain: points over {grid.label(grid.baseline)} with the same axis values and seed; "
                    "speed-up: its rounds-to-target / the method's (`>x`: only the method reached the target)")
    return "\n".join(head) + "\n\n" + cells_md(rows, grid)


# ----------------------------------------------------------------------------- running
def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _done_line(grid: Grid, res: CellResult, seconds: float) -> str:
    target = f" r@{100 * grid.target:g}% {fmt_rounds(res.rounds_to_target)}," if grid.target is not None else ","
    return (f"final {fmt_acc(res.final_accuracy)} % best {fmt_acc(res.best_accuracy)} %{target} "
            f"{res.rounds} rounds, {seconds:.0f} s")


def _run_cell(plan: Planned, say: Reporter) -> None:
    """Train one cell (resume it when it has checkpoints; start over when that is refused)."""
    from fedsim import engine
    from fedsim.errors import ResumeError

    if plan.state == "resume":
        try:
            engine.run_scenario(plan.scenario, plan.dir, progress="none", resume=True)
            return
        except ResumeError as exc:
            say.progress(f"  cannot resume {plan.dir} ({str(exc).splitlines()[0]}); starting the cell over")
    if plan.dir.exists():
        shutil.rmtree(plan.dir)       # this cell's folder only: an unfinished or replaced run
    engine.run_scenario(plan.scenario, plan.dir, progress="none")


def run_sweep(grid: Grid, *, out: str | Path | None = None, methods: Sequence[str] | None = None,
              subset: int | None = None, only: Sequence[str] = (), budget_min: float | None = None,
              dry_run: bool = False, report_only: bool = False, overwrite: bool = False,
              reporter: Reporter | None = None, clock: Callable[[], float] = time.monotonic) -> SweepOutcome:
    """Run the selected cells of ``grid`` that are not done, one after another, then write the tables.

    Args:
        grid: a validated grid (:func:`fedsim.sweep.load_grid`).
        out: the sweep folder (default: the grid's ``out``).
        methods, subset, only: the selection (:func:`fedsim.sweep.select_cells`).
        budget_min: start no new cell once this many minutes have passed (the running cell finishes).
        dry_run: list the cells and their state; run nothing, write nothing.
        report_only: run nothing; rebuild ``sweep.json``, the tables and plots from the cells on disk.
        overwrite: re-run cells whose folder holds a finished run of another configuration.
        reporter: where progress and results are printed.
        clock: seconds, for the budget and the ETA.

    Raises:
        GridError: bad selection or invalid cells (nothing has run then).
    """
    from fedsim.data import DataUnavailableError
    from fedsim.errors import RunError
    from fedsim.scenario import ScenarioError

    say = reporter or Reporter()
    t0 = clock()
    out = Path(out) if out is not None else grid.out
    plans = plan_cells(grid, select_cells(grid, methods=methods, subset=subset, only=only), out,
                       overwrite=overwrite, report_only=report_only or dry_run)
    if dry_run:
        _list(grid, out, plans, say, overwrite)
        return SweepOutcome(0, all(p.state == "done" for p in plans))
    statuses = {p.cell.id: "done" if p.state == "done" else "stale" if report_only and p.state == "stale"
                else "pending" for p in plans}
    notes = {p.cell.id: p.note for p in plans if p.note}
    todo = [] if report_only else [p for p in plans if p.state in TO_RUN]
    out.mkdir(parents=True, exist_ok=True)
    _header(grid, out, plans, todo, say, report_only)
    durations: list[float] = []
    ran = failed = 0
    code = 0
    try:
        for k, plan in enumerate(todo, 1):
            index = plans.index(plan) + 1
            spent = clock() - t0
            if budget_min is not None and spent >= 60 * budget_min:
                say.result(f"budget of {budget_min:g} min spent ({_minutes(spent)}): {len(todo) - k + 1} cell(s) "
                           "not started. The sweep is incomplete: run the same command again to continue "
                           "(finished cells are kept and not re-run).")
                break
            eta = (f"ETA {_minutes(sum(durations) / len(durations) * (len(todo) - k + 1))} for "
                   f"{len(todo) - k + 1} cell(s)") if durations else "ETA after the first cell"
            why = f"; {plan.note}: {'resuming' if plan.state == 'resume' else 'starting over'}" \
                if plan.state in ("partial", "resume", "stale") else ""
            say.progress(f"[{index}/{len(plans)}] {plan.cell.id}: {' '.join(plan.cell.own)}  ({eta}{why})")
            started = clock()
            try:
                _run_cell(plan, say)
            except DataUnavailableError as exc:
                statuses[plan.cell.id], notes[plan.cell.id] = "failed", f"data set unavailable: {exc}"
                say.result(f"[{index}/{len(plans)}] {plan.cell.id}: data set unavailable: {exc}; stopping the sweep")
                failed, code = failed + 1, 2
                break
            except (ScenarioError, RunError) as exc:
                statuses[plan.cell.id], notes[plan.cell.id] = "failed", str(exc)
                say.result(f"[{index}/{len(plans)}] {plan.cell.id}: FAILED: {exc}")
                failed += 1
                code = max(code, 2 if isinstance(exc, ScenarioError) else 1)
            else:
                statuses[plan.cell.id] = "done"
                notes.pop(plan.cell.id, None)
                res = read_result(plan.dir, grid.target, grid.metrics)
                say.result(f"[{index}/{len(plans)}] {plan.cell.id}: {_done_line(grid, res, clock() - started)}")
                ran += 1
            durations.append(clock() - started)
            write_outputs(grid, out, plans, statuses, notes, final=False)
    except KeyboardInterrupt:
        say.progress("interrupted: the cell that was running starts over when the same command runs again; "
                     "finished cells are kept")
        write_outputs(grid, out, plans, statuses, notes, final=False)
        raise
    rows, files = write_outputs(grid, out, plans, statuses, notes, final=True)
    complete = all(s == "done" for s in statuses.values())
    _footer(out, statuses, failed, files, clock() - t0, say)
    return SweepOutcome(code, complete, rows, files, ran, failed)


def _header(grid: Grid, out: Path, plans: Sequence[Planned], todo: Sequence[Planned], say: Reporter,
            report_only: bool) -> None:
    done = sum(p.state == "done" for p in plans)
    what = "report only, nothing runs" if report_only else f"{done} done earlier (kept), {len(todo)} to run"
    say.progress(f"sweep {grid.name}: {len(plans)} cell(s), {what} -> {out}")
    common = " ".join(grid.overrides + grid.extra)
    if common:
        say.progress(f"  every cell: {common}")


def _footer(out: Path, statuses: dict[str, str], failed: int, files: Sequence[Path], seconds: float,
            say: Reporter) -> None:
    counts = {s: sum(v == s for v in statuses.values()) for s in ("done", "failed", "pending", "stale")}
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    say.result(f"sweep: {', '.join(parts)} of {len(statuses)} cell(s) in {_minutes(seconds)}; wrote "
               f"{', '.join(f.name for f in files)} in {out}")
    if failed:
        bad = [c for c, s in statuses.items() if s == "failed"]
        say.result(f"{failed} cell(s) failed ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): the reasons "
                   f"are above and in {out / 'sweep.json'}; the same command re-runs them from scratch")
    if counts["stale"]:
        say.result(f"{counts['stale']} cell(s) hold a run of another configuration (status stale in sweep.json); "
                   "re-run with --overwrite to replace them")


def _list(grid: Grid, out: Path, plans: Sequence[Planned], say: Reporter, overwrite: bool) -> None:
    say.result(f"sweep {grid.name}: {len(plans)} cell(s) -> {out} (dry run: nothing runs)")
    common = " ".join(grid.overrides + grid.extra)
    if common:
        say.result(f"  every cell: {common}")
    for i, p in enumerate(plans, 1):
        state = {"done": "done", "new": "to run", "partial": "to run (start over)", "resume": "to run (resume)",
                 "stale": "to run (replaces a run of another configuration)" if overwrite else
                 "REFUSED without --overwrite (a finished run of another configuration is there)"}[p.state]
        if p.state == "stale":
            state += f" [{p.note}]"
        say.result(f"[{i}/{len(plans)}] {p.cell.id}  {state}: {' '.join(p.cell.own)}")
    counts = {s: sum(p.state == s for p in plans) for s in ("done", "new", "partial", "resume", "stale")}
    say.result("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
