"""Sweep tables: what each cell's run directory says, gains and speed-ups over a baseline method,
mean/std over seeds, and the CSV/Markdown renderings.

Definitions (the same as the FedHyper reproduction's, benchmarks/papers/RESULTS.md):
  * final accuracy: the last evaluated test accuracy of the run (``summary.json``).
  * gain: method final accuracy - baseline final accuracy, same axis values and seed, in points.
  * rounds to target: first evaluated round with test accuracy >= target; "never" if none.
  * speed-up: baseline rounds-to-target / method rounds-to-target (> 1 = method faster). Only the
    method reached the target: the lower bound ``>R/r`` (R = rounds run); only the baseline: "never";
    neither: "-".

Example:
    >>> round(gain_points(0.80, 0.75), 6), speedup(12, 4, 15), speedup(None, 5, 15)
    (5.0, (3.0, '3.00x'), (None, '>3.00x'))
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.sweep.grid import Cell, Grid, value_text

__all__ = ["CellResult", "CellRow", "SeedGroup", "build_rows", "cells_csv", "cells_md", "compare_md", "fmt_acc",
           "fmt_gain", "fmt_rounds", "gain_points", "heat_values", "mean_std", "read_result", "seed_groups", "seeds_csv", "speedup"]


# ----------------------------------------------------------------------------- table maths
def gain_points(method_acc: float | None, baseline_acc: float | None) -> float | None:
    """Gain of a method over the baseline in percentage points (accuracies in [0, 1])."""
    if method_acc is None or baseline_acc is None:
        return None
    return 100.0 * (float(method_acc) - float(baseline_acc))


def speedup(baseline_rounds: int | None, method_rounds: int | None, total_rounds: int) -> tuple[float | None, str]:
    """Rounds-to-target ratio baseline/method (> 1: the method is faster) and its display text.

    Returns ``(value, text)``; ``value`` is None unless both reached the target.
    Only the method reached it: ``(None, ">R/r")`` (a lower bound, ``R`` = rounds run).
    Only the baseline reached it: ``(None, "never")``. Neither: ``(None, "-")``.
    """
    if method_rounds is not None and baseline_rounds is not None:
        value = baseline_rounds / method_rounds
        return value, f"{value:.2f}x"
    if method_rounds is not None:
        return None, f">{total_rounds / method_rounds:.2f}x"
    if baseline_rounds is not None:
        return None, "never"
    return None, "-"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values).

    Example:
        >>> [round(x, 4) for x in mean_std([0.5, 0.7])], mean_std([0.5]), mean_std([])
        ([0.6, 0.1414], (0.5, None), (None, None))
    """
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_rounds(rounds: int | None) -> str:
    """Rounds-to-target for a table: the round, or ``never``."""
    return "never" if rounds is None else str(rounds)


def fmt_acc(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.1f}"


def fmt_gain(gain: float | None) -> str:
    return "-" if gain is None else f"{gain:+.1f}"


def _pm(mean: float | None, std: float | None, scale: float = 100.0, sign: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{scale * mean:+.1f}" if sign else f"{scale * mean:.1f}"
    return text if std is None else f"{text} ± {scale * std:.1f}"


# ----------------------------------------------------------------------------- reading runs
@dataclass
class CellResult:
    """What the tables need from one finished run (its ``summary.json`` and ``metrics.jsonl``)."""

    final_accuracy: float | None
    best_accuracy: float | None
    rounds: int
    rounds_to_target: int | None = None
    best_round: int | None = None
    wall_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def read_result(run_dir: Path, target: float | None, metrics: Sequence[str] = ()) -> CellResult:
    """A finished run's figures through ``fedsim report``'s reader; ``metrics``: the last value of each."""
    from fedsim.results import compare_runs, read_metrics, rounds_to_target

    row = compare_runs([run_dir])[0]
    rows: list[Mapping[str, Any]] = list(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else []
    last = {m: next((r[m] for r in reversed(rows) if r.get(m) is not None), None) for m in metrics}
    return CellResult(final_accuracy=row.get("final_accuracy"), best_accuracy=row.get("best_accuracy"),
                      rounds=int(row.get("rounds_completed") or 0), best_round=row.get("best_round"),
                      rounds_to_target=None if target is None else rounds_to_target(rows, [target])[f"{target:g}"],
                      wall_s=row.get("wall_s"), metrics=last)


# ----------------------------------------------------------------------------- rows
@dataclass
class CellRow:
    """One cell of the table: its status, figures and comparison with the baseline's cell."""

    cell: Cell
    status: str
    result: CellResult | None
    gain: float | None = None
    speedup: float | None = None
    speedup_text: str = "-"


def build_rows(cells: Sequence[Cell], results: dict[str, CellResult], statuses: dict[str, str],
               baseline: str | None) -> list[CellRow]:
    """Rows for every cell; gain and speed-up against the baseline method's cell with the same axis values
    and seed (none for the baseline itself, or when either is missing)."""
    by_key = {(c.point, c.seed, c.method): c for c in cells}
    rows = []
    for c in cells:
        res = results.get(c.id)
        row = CellRow(c, statuses.get(c.id, "pending"), res)
        base_cell = by_key.get((c.point, c.seed, baseline)) if baseline and c.method != baseline else None
        base = results.get(base_cell.id) if base_cell else None
        if res is not None and base is not None:
            row.gain = gain_points(res.final_accuracy, base.final_accuracy)
            if res.rounds_to_target is not None or base.rounds_to_target is not None:
                row.speedup, row.speedup_text = speedup(base.rounds_to_target, res.rounds_to_target,
                                                        max(res.rounds, base.rounds))
        rows.append(row)
    return rows


@dataclass
class SeedGroup:
    """The cells of one (method, axis values) over the seeds."""

    method: str | None
    point: tuple[tuple[str, Any], ...]
    rows: list[CellRow]

    @property
    def done(self) -> list[CellResult]:
        return [r.result for r in self.rows if r.result is not None]

    def stat(self, what: str) -> tuple[float | None, float | None]:
        if what == "gain":
            return mean_std([r.gain for r in self.rows if r.gain is not None])
        values = [getattr(res, what) for res in self.done]
        return mean_std([v for v in values if v is not None])

    def reached(self) -> tuple[int, int]:
        return sum(res.rounds_to_target is not None for res in self.done), len(self.done)


def seed_groups(rows: Sequence[CellRow]) -> list[SeedGroup]:
    """Rows grouped by (method, axis values), in first-seen order."""
    groups: dict[tuple, SeedGroup] = {}
    for r in rows:
        key = (r.cell.method, r.cell.point)
        groups.setdefault(key, SeedGroup(r.cell.method, r.cell.point, [])).rows.append(r)
    return list(groups.values())


# ----------------------------------------------------------------------------- renderings
def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def cells_csv(rows: Sequence[CellRow], grid: Grid) -> str:
    """One row per cell (long format): id, method, one column per axis, seed, status and the figures."""
    axes = [a.name for a in grid.axes]
    fields = ["cell", "method", *axes, "seed", "status", "final_accuracy", "best_accuracy", "best_round", "rounds",
              "rounds_to_target", "gain_pts", "speedup", "speedup_text", "wall_s",
              *[f"final_{m}" for m in grid.metrics]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        res = r.result
        is_base = grid.baseline is not None and r.cell.method == grid.baseline
        line = {"cell": r.cell.id, "method": r.cell.method or "", "seed": r.cell.seed, "status": r.status,
                **{a: value_text(v) for a, v in r.cell.point}}
        if res is not None:
            line.update(final_accuracy=_num(res.final_accuracy, ".4f"), best_accuracy=_num(res.best_accuracy, ".4f"),
                        best_round="" if res.best_round is None else res.best_round, rounds=res.rounds,
                        rounds_to_target="" if grid.target is None else fmt_rounds(res.rounds_to_target),
                        wall_s=_num(res.wall_s, ".1f"),
                        **{f"final_{m}": "" if res.metrics.get(m) is None else f"{res.metrics[m]:.4g}"
                           for m in grid.metrics})
        line.update(gain_pts=_num(r.gain, ".2f"), speedup=_num(r.speedup, ".3f"),
                    speedup_text="" if is_base or grid.baseline is None or grid.target is None else r.speedup_text)
        w.writerow(line)
    return buf.getvalue()


def seeds_csv(groups: Sequence[SeedGroup], grid: Grid) -> str:
    """One row per (method, axis values): seeds done, mean and std of final/best accuracy and of the gain."""
    axes = [a.name for a in grid.axes]
    fields = ["method", *axes, "seeds", "seeds_done", "final_accuracy_mean", "final_accuracy_std",
              "best_accuracy_mean", "best_accuracy_std", "gain_pts_mean", "gain_pts_std", "reached_target"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for g in groups:
        (fm, fs), (bm, bs), (gm, gs) = g.stat("final_accuracy"), g.stat("best_accuracy"), g.stat("gain")
        k, n = g.reached()
        w.writerow({"method": g.method or "", **{a: value_text(v) for a, v in g.point}, "seeds": len(g.rows),
                    "seeds_done": n, "final_accuracy_mean": _num(fm, ".4f"), "final_accuracy_std": _num(fs, ".4f"),
                    "best_accuracy_mean": _num(bm, ".4f"), "best_accuracy_std": _num(bs, ".4f"),
                    "gain_pts_mean": _num(gm, ".2f"), "gain_pts_std": _num(gs, ".2f"),
                    "reached_target": "" if grid.target is None else f"{k}/{n}"})
    return buf.getvalue()


def _md(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def _target_head(grid: Grid) -> str:
    return f"r@{100 * grid.target:g}%" if grid.target is not None else ""


def cells_md(rows: Sequence[CellRow], grid: Grid) -> str:
    """The per-cell table (and, with several seeds, the mean ± std over seeds) as Markdown."""
    labels = [a.label for a in grid.axes]
    has_m, has_t, has_b = bool(grid.methods), grid.target is not None, grid.baseline is not None
    head = ["cell", *(["method"] if has_m else []), *labels, "seed", "status", "final acc %", "best acc %", "rounds",
            *([_target_head(grid)] if has_t else []), *(["gain pts", "speed-up"] if has_b and has_t else
                                                       ["gain pts"] if has_b else []), "wall s"]
    body = []
    for r in rows:
        res = r.result
        is_base = r.cell.method == grid.baseline
        line = [f"`{r.cell.id}`", *([grid.label(r.cell.method)] if has_m else []),
                *[value_text(v) for _, v in r.cell.point], str(r.cell.seed), r.status,
                fmt_acc(res.final_accuracy if res else None), fmt_acc(res.best_accuracy if res else None),
                str(res.rounds) if res else "-"]
        if has_t:
            line.append(fmt_rounds(res.rounds_to_target) if res else "-")
        if has_b:
            line.append("" if is_base else fmt_gain(r.gain))
            if has_t:
                line.append("" if is_base else r.speedup_text)
        line.append("-" if res is None or res.wall_s is None else f"{res.wall_s:.0f}")
        body.append(line)
    out = _md(head, body)
    if len(grid.seeds) > 1:
        out += ["", f"Mean ± sample std over seeds ({len(grid.seeds)} per point; the std needs 2 finished):", ""]
        out += _md(*_seeds_table(seed_groups(rows), grid))
    return "\n".join(out) + "\n"


def _seeds_table(groups: Sequence[SeedGroup], grid: Grid) -> tuple[list[str], list[list[str]]]:
    head = [*(["method"] if grid.methods else []), *[a.label for a in grid.axes], "seeds done", "final acc %",
            "best acc %", *(["gain pts"] if grid.baseline else []),
            *([f"reached {100 * grid.target:g}%"] if grid.target is not None else [])]
    body = []
    for g in groups:
        k, n = g.reached()
        line = [*([grid.label(g.method)] if grid.methods else []), *[value_text(v) for _, v in g.point],
                f"{n}/{len(g.rows)}", _pm(*g.stat("final_accuracy")), _pm(*g.stat("best_accuracy"))]
        if grid.baseline:
            line.append("" if g.method == grid.baseline else _pm(*g.stat("gain"), scale=1.0, sign=True))
        if grid.target is not None:
            line.append(f"{k}/{n}")
        body.append(line)
    return head, body


def compare_md(rows: Sequence[CellRow], grid: Grid) -> str:
    """Methods side by side, one line per axis point: per method the final accuracy and rounds-to-target,
    and for every method but the baseline its gain and speed-up over the baseline (one seed: the run's
    figures; several seeds: mean ± std, rounds-to-target as the median of the seeds that reached it and
    how many did, speed-up as the median over the seeds where both reached the target)."""
    methods = list(dict.fromkeys(r.cell.method for r in rows))
    points = list(dict.fromkeys(r.cell.point for r in rows))
    by: dict[tuple, list[CellRow]] = {}
    for r in rows:
        by.setdefault((r.cell.point, r.cell.method), []).append(r)
    multi = len({r.cell.seed for r in rows}) > 1
    head = [a.label for a in grid.axes]
    for m in methods:
        lab = grid.label(m)
        head += [f"{lab} acc %"] + ([f"{lab} {_target_head(grid)}"] if grid.target is not None else [])
        if grid.baseline and m != grid.baseline:
            head += [f"{lab} gain pts"] + ([f"{lab} speed-up"] if grid.target is not None else [])
    body = []
    for p in points:
        line = [value_text(v) for _, v in p]
        for m in methods:
            group = by.get((p, m), [])
            line += _compare_cells(group, grid, m != grid.baseline, multi)
        body.append(line)
    return "\n".join(_md(head, body)) + "\n"


def _compare_cells(group: list[CellRow], grid: Grid, vs_base: bool, multi: bool) -> list[str]:
    done = [r.result for r in group if r.result is not None]
    has_t, has_b = grid.target is not None, grid.baseline is not None and vs_base
    if not multi:
        r = group[0] if group else None
        res = r.result if r else None
        out = [fmt_acc(res.final_accuracy if res else None)]
        out += [fmt_rounds(res.rounds_to_target) if res else "-"] if has_t else []
        if has_b:
            out += [fmt_gain(r.gain if r else None)] + ([r.speedup_text if r else "-"] if has_t else [])
        return out
    out = [_pm(*mean_std([res.final_accuracy for res in done if res.final_accuracy is not None]))]
    if has_t:
        reached = [res.rounds_to_target for res in done if res.rounds_to_target is not None]
        med = "-" if not done else (f"{statistics.median(reached):g}" if reached else "never")
        out.append(f"{med} ({len(reached)}/{len(done)})" if done else "-")
    if has_b:
        out.append(_pm(*mean_std([r.gain for r in group if r.gain is not None]), scale=1.0, sign=True))
        if has_t:
            ups = [r.speedup for r in group if r.speedup is not None]
            out.append(f"{statistics.median(ups):.2f}x (n={len(ups)})" if ups else "-")
    return out


def heat_values(rows: Sequence[CellRow], grid: Grid, method: str | None,
                what: str) -> tuple[list[list[float | None]], list[Any], list[Any]]:
    """``(matrix, row values, column values)``: first axis = rows, second = columns (the values the rows
    cover, in grid order); each entry the mean over seeds of the final accuracy in % (``what="acc"``) or of
    the gain in points (``what="gain"``), None where no cell finished."""
    a, b = grid.axes
    cells: dict[tuple[str, str], list[float]] = {}
    seen_a, seen_b = set(), set()
    for r in rows:
        v = r.cell.values
        ka, kb = value_text(v[a.name]), value_text(v[b.name])
        seen_a.add(ka)
        seen_b.add(kb)
        if r.cell.method != method:
            continue
        value = r.gain if what == "gain" else (None if r.result is None or r.result.final_accuracy is None
                                               else 100 * r.result.final_accuracy)
        if value is not None and math.isfinite(value):
            cells.setdefault((ka, kb), []).append(value)
    xs = [x for x in a.values if value_text(x) in seen_a]
    ys = [y for y in b.values if value_text(y) in seen_b]
    matrix = [[statistics.fmean(cells[(value_text(x), value_text(y))]) if (value_text(x), value_text(y)) in cells
               else None for y in ys] for x in xs]
    return matrix, xs, ys
