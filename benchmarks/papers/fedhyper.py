"""FedHyper robustness grid: FedAvg vs FedHyper over initial global LR x initial local LR.

Reproduces the *shape* of the paper's Fig. 4 experiment (arXiv:2310.03156; see
shared/specs/fedhyper.md §3): every (method, cell) of the grid is one fedsim run of
the dataset's base scenario with overrides, run once via ``fedsim.engine.run_scenario``.
The sweep definition (datasets, axes, methods as override lists) is
``benchmarks/papers/fedhyper_grid.yaml``.

Usage (the "10-minute version" on 2 CPUs; see benchmarks/papers/RESULTS.md)::

    python benchmarks/papers/fedhyper.py --dataset fmnist --subset 3 --rounds 15 \\
        --methods fedavg,fedhyper-g+cl --out runs/papers/fedhyper-fmnist

Runs are resumable: a run directory whose ``summary.json`` carries the same config hash is
skipped. ``--report-only`` rewrites the tables/plots from the runs already on disk.

Outputs in ``--out``: ``runs/<method>/g<global>_l<local>/`` (fedsim run directories),
``table.csv``, ``table.md``, ``heatmap_<method>.png`` (final accuracy), ``gain_<method>.png``
(gain over FedAvg, points; not for FedAvg itself), ``summary.md``.

Definitions (pure functions below, unit-tested in tests/unit/test_fedhyper_sweep.py):
  * final accuracy: the last evaluated test accuracy of the run (``summary.json``).
  * gain: (method final accuracy - FedAvg final accuracy) in percentage points, same cell.
  * rounds to target: first evaluated round with test accuracy >= target; "never" if none.
  * speed-up: FedAvg rounds-to-target / method rounds-to-target (> 1 = method faster). When
    only the method reaches the target it is a lower bound ``>R/r`` (FedAvg would need more
    than the R rounds run); when only FedAvg reaches it, "never"; when neither, "-".
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[2]
GRID_FILE = REPO / "benchmarks" / "papers" / "fedhyper_grid.yaml"
BASELINE = "fedavg"


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


def fmt_rounds(rounds: int | None) -> str:
    """Rounds-to-target for a table: the round, or ``never``."""
    return "never" if rounds is None else str(rounds)


def fmt_acc(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.1f}"


def fmt_gain(gain: float | None) -> str:
    return "-" if gain is None else f"{gain:+.1f}"


def subset_indices(n: int, k: int) -> list[int]:
    """``k`` of ``n`` evenly spread grid indices, corners first: 1 -> centre, 2 -> both ends,
    3 -> ends + centre, ``k >= n`` -> all."""
    if k < 1:
        raise ValueError(f"--subset must be >= 1 (got {k})")
    if k >= n:
        return list(range(n))
    if k == 1:
        return [(n - 1) // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def select_cells(global_values: Sequence[float], local_values: Sequence[float],
                 subset: int | None) -> list[tuple[float, float]]:
    """The (global LR, local LR) cells to run: the full grid, or the ``subset`` x ``subset``
    corner+centre cells."""
    gi = subset_indices(len(global_values), subset) if subset else range(len(global_values))
    li = subset_indices(len(local_values), subset) if subset else range(len(local_values))
    return [(global_values[i], local_values[j]) for i in gi for j in li]


@dataclass
class RunResult:
    """What the tables need from one finished run."""

    final_accuracy: float | None
    best_accuracy: float | None
    rounds: int
    rounds_to_target: int | None
    wall_s: float | None = None
    lr_global: float | None = None
    lr_local_mean: float | None = None


@dataclass
class Row:
    """One (cell, method) row of the table."""

    global_lr: float
    local_lr: float
    method: str
    result: RunResult | None
    gain: float | None = None
    speedup: float | None = None
    speedup_text: str = "-"
    extra: dict = field(default_factory=dict)


def build_rows(cells: Sequence[tuple[float, float]], methods: Sequence[str],
               results: Mapping[tuple[str, float, float], RunResult]) -> list[Row]:
    """Table rows for every (cell, method); gain and speed-up relative to FedAvg of the cell."""
    rows = []
    for g, l in cells:
        base = results.get((BASELINE, g, l))
        for m in methods:
            res = results.get((m, g, l))
            row = Row(g, l, m, res)
            if res is not None and base is not None and m != BASELINE:
                row.gain = gain_points(res.final_accuracy, base.final_accuracy)
                row.speedup, row.speedup_text = speedup(base.rounds_to_target, res.rounds_to_target,
                                                        max(res.rounds, base.rounds))
            rows.append(row)
    return rows


def method_summary(rows: Sequence[Row], method: str) -> dict[str, Any]:
    """Aggregates over the cells of one method (vs FedAvg): mean/max/min gain, wins, speed-ups."""
    mine = [r for r in rows if r.method == method and r.gain is not None]
    out: dict[str, Any] = {"method": method, "cells": len(mine)}
    if not mine:
        return out
    gains = [r.gain for r in mine]
    best = max(mine, key=lambda r: r.gain)
    worst = min(mine, key=lambda r: r.gain)
    ups = [r.speedup for r in mine if r.speedup is not None]
    out.update(mean_gain=statistics.fmean(gains), max_gain=best.gain, max_gain_cell=(best.global_lr, best.local_lr),
               min_gain=worst.gain, min_gain_cell=(worst.global_lr, worst.local_lr),
               wins=sum(g > 0.5 for g in gains), losses=sum(g < -0.5 for g in gains),
               both_reached=len(ups), median_speedup=statistics.median(ups) if ups else None,
               min_speedup=min(ups) if ups else None, max_speedup=max(ups) if ups else None,
               only_method=sum(r.speedup_text.startswith(">") for r in mine),
               only_baseline=sum(r.speedup_text == "never" for r in mine))
    return out


# ----------------------------------------------------------------------------- grid / runs
def load_grid(path: str | Path = GRID_FILE) -> dict:
    """The sweep definition (datasets, axes, methods)."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def axis_key(grid: Mapping, axis: str, method: str) -> str:
    """The scenario key an axis sets for a method (per-method mapping, else ``default``)."""
    keys = grid["axes"][axis]["keys"]
    return keys.get(method, keys["default"])


def run_overrides(grid: Mapping, method: str, global_lr: float, local_lr: float,
                  rounds: int | None = None, engine: str | None = None,
                  extra: Sequence[str] = ()) -> list[str]:
    """Every ``--set`` override of one (method, cell) run, in application order."""
    out = list(grid["methods"][method]["overrides"])
    out += [f"{axis_key(grid, 'global_lr', method)}={global_lr!r}",
            f"{axis_key(grid, 'local_lr', method)}={local_lr!r}"]
    if rounds is not None:
        out.append(f"federation.rounds={int(rounds)}")
    if engine is not None:
        out.append(f"engine.kind={engine}")
    return out + list(extra)


def load_run(grid: Mapping, dataset: str, method: str, global_lr: float, local_lr: float,
             rounds: int | None = None, engine: str | None = None, extra: Sequence[str] = ()):
    """The validated scenario of one (method, cell) run."""
    from fedsim.scenario import load_scenario

    base = REPO / grid["datasets"][dataset]["scenario"]
    return load_scenario(base, run_overrides(grid, method, global_lr, local_lr, rounds, engine, extra))


def cell_dirname(global_lr: float, local_lr: float) -> str:
    return f"g{global_lr:g}_l{local_lr:g}"


def read_result(run_dir: Path, target: float, expected_sha: str | None = None) -> RunResult | None:
    """A finished run's figures, or None if the run is missing, unfinished or from another config."""
    from fedsim.results import read_json, read_metrics, rounds_to_target

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return None
    summary = read_json(summary_path)
    if expected_sha is not None and summary.get("config_sha256") != expected_sha:
        return None
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}
    return RunResult(
        final_accuracy=summary.get("final_accuracy"), best_accuracy=summary.get("best_accuracy"),
        rounds=int(summary.get("rounds_completed") or 0),
        rounds_to_target=rounds_to_target(rows, [target])[f"{target:g}"],
        wall_s=summary.get("wall_s"), lr_global=last.get("lr_global"), lr_local_mean=last.get("lr_local_mean"))


# ----------------------------------------------------------------------------- outputs
CSV_FIELDS = ["global_lr", "local_lr", "method", "final_accuracy", "best_accuracy", "gain_pts", "rounds",
              "rounds_to_target", "speedup", "speedup_text", "final_lr_global", "final_lr_local_mean", "wall_s"]


def table_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        res = r.result
        w.writerow({
            "global_lr": r.global_lr, "local_lr": r.local_lr, "method": r.method,
            "final_accuracy": "" if res is None or res.final_accuracy is None else f"{res.final_accuracy:.4f}",
            "best_accuracy": "" if res is None or res.best_accuracy is None else f"{res.best_accuracy:.4f}",
            "gain_pts": "" if r.gain is None else f"{r.gain:.2f}",
            "rounds": "" if res is None else res.rounds,
            "rounds_to_target": "" if res is None else fmt_rounds(res.rounds_to_target),
            "speedup": "" if r.speedup is None else f"{r.speedup:.3f}",
            "speedup_text": r.speedup_text if r.method != BASELINE else "",
            "final_lr_global": "" if res is None or res.lr_global is None else f"{res.lr_global:.4g}",
            "final_lr_local_mean": "" if res is None or res.lr_local_mean is None else f"{res.lr_local_mean:.4g}",
            "wall_s": "" if res is None or res.wall_s is None else f"{res.wall_s:.1f}",
        })
    return buf.getvalue()


def table_md(rows: Sequence[Row], methods: Sequence[str], labels: Mapping[str, str], target: float) -> str:
    """One line per cell: FedAvg's accuracy and rounds-to-target, then per method accuracy, gain,
    rounds-to-target and speed-up vs FedAvg."""
    by = {(r.global_lr, r.local_lr, r.method): r for r in rows}
    cells = list(dict.fromkeys((r.global_lr, r.local_lr) for r in rows))
    head = ["global LR", "local LR"]
    for m in methods:
        lab = labels.get(m, m)
        head += [f"{lab} acc %", f"{lab} r@{100 * target:g}%"]
        if m != BASELINE:
            head += [f"{lab} gain pts", f"{lab} speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, l in cells:
        out = [f"{g:g}", f"{l:g}"]
        for m in methods:
            r = by.get((g, l, m))
            res = r.result if r else None
            out += [fmt_acc(res.final_accuracy if res else None), fmt_rounds(res.rounds_to_target) if res else "-"]
            if m != BASELINE:
                out += [fmt_gain(r.gain if r else None), r.speedup_text if r else "-"]
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _heatmap(path: Path, matrix: list[list[float | None]], rows: Sequence[float], cols: Sequence[float],
             title: str, cbar: str, diverging: bool) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig = Figure(figsize=(max(6.0, 1.2 * len(cols) + 2.4), max(3.4, 1.0 * len(rows) + 1.6)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = data[np.isfinite(data)]
    if diverging:
        lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    else:
        im = ax.imshow(data, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    ax.set_xlabel("initial local LR")
    ax.set_ylabel("initial global LR")
    ax.set_title(title, fontsize=10)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(data[i, j]):
                rgba = im.cmap(im.norm(data[i, j]))
                dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                ax.text(j, i, f"{data[i, j]:+.1f}" if diverging else f"{data[i, j]:.1f}", ha="center",
                        va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_heatmaps(out: Path, rows: Sequence[Row], methods: Sequence[str], labels: Mapping[str, str],
                   dataset: str) -> list[Path]:
    gs = sorted({r.global_lr for r in rows})
    ls = sorted({r.local_lr for r in rows})
    by = {(r.global_lr, r.local_lr, r.method): r for r in rows}
    written = []
    for m in methods:
        def cell(g, l, what):
            r = by.get((g, l, m))
            if r is None or r.result is None:
                return None
            if what == "acc":
                return None if r.result.final_accuracy is None else 100 * r.result.final_accuracy
            return r.gain
        acc = [[cell(g, l, "acc") for l in ls] for g in gs]
        p = out / f"heatmap_{m}.png"
        _heatmap(p, acc, gs, ls, f"{dataset}: {labels.get(m, m)} final accuracy (%)", "accuracy %", False)
        written.append(p)
        if m != BASELINE:
            gain = [[cell(g, l, "gain") for l in ls] for g in gs]
            p = out / f"gain_{m}.png"
            _heatmap(p, gain, gs, ls, f"{dataset}: {labels.get(m, m)} gain over FedAvg (points)", "points", True)
            written.append(p)
    return written


def summary_md(rows: Sequence[Row], methods: Sequence[str], labels: Mapping[str, str], *, dataset: str,
               target: float, rounds: int | None, command: str, wall_s: float, missing: int) -> str:
    lines = [f"# FedHyper robustness grid: {dataset}", "",
             f"- command: `{command}`",
             f"- rounds per run: {rounds if rounds is not None else 'scenario default'}; target accuracy "
             f"{100 * target:g} %; cells: {len({(r.global_lr, r.local_lr) for r in rows})}; methods: "
             f"{', '.join(methods)}",
             f"- wall time of this invocation: {wall_s / 60:.1f} min; runs missing: {missing}", ""]
    base = [r for r in rows if r.method == BASELINE and r.result is not None and r.result.final_accuracy is not None]
    if base:
        accs = [100 * r.result.final_accuracy for r in base]
        lines.append(f"FedAvg final accuracy across the cells: {min(accs):.1f}–{max(accs):.1f} %.")
        lines.append("")
    lines += ["| method | cells | mean gain pts | max gain (cell g/l) | min gain (cell g/l) | wins/losses (>0.5 pt) "
              "| speed-up median [min, max] (both reached) | only method / only FedAvg reached |",
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        if m == BASELINE:
            continue
        s = method_summary(rows, m)
        if not s.get("cells"):
            lines.append(f"| {labels.get(m, m)} | 0 | - | - | - | - | - | - |")
            continue
        sp = ("-" if s["median_speedup"] is None else
              f"{s['median_speedup']:.2f}x [{s['min_speedup']:.2f}, {s['max_speedup']:.2f}] (n={s['both_reached']})")
        lines.append(f"| {labels.get(m, m)} | {s['cells']} | {s['mean_gain']:+.1f} | {s['max_gain']:+.1f} "
                     f"({s['max_gain_cell'][0]:g}/{s['max_gain_cell'][1]:g}) | {s['min_gain']:+.1f} "
                     f"({s['min_gain_cell'][0]:g}/{s['min_gain_cell'][1]:g}) | {s['wins']}/{s['losses']} | {sp} | "
                     f"{s['only_method']} / {s['only_baseline']} |")
    lines += ["", "Paper's claims (spec §3, not targets): 1.1–3x fewer rounds to a target accuracy; up to +15 "
              "points at poor initial LRs.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fmnist", help="a dataset of the grid file (fmnist | shakespeare)")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds of every run (default: scenario's)")
    p.add_argument("--subset", type=int, default=None,
                   help="K: run the K x K corner+centre cells of the 5x5 grid (3 -> {0.5,1,2} x {0.001,0.01,0.1})")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all of the grid file)")
    p.add_argument("--out", default=None, help="output folder (default runs/papers/fedhyper-<dataset>)")
    p.add_argument("--engine", choices=["inprocess", "workers"], default=None, help="engine.kind override")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra scenario override for every run (repeatable)")
    p.add_argument("--target", type=float, default=None, help="target accuracy (default: the grid file's)")
    p.add_argument("--grid", default=str(GRID_FILE), help="the sweep definition YAML")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no new run after this many minutes; tables cover what finished")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables/plots from finished runs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    grid = load_grid(args.grid)
    if args.dataset not in grid["datasets"]:
        sys.exit(f"unknown dataset '{args.dataset}' (grid file has: {', '.join(grid['datasets'])})")
    methods = args.methods.split(",") if args.methods else list(grid["methods"])
    unknown = [m for m in methods if m not in grid["methods"]]
    if unknown:
        sys.exit(f"unknown method(s) {unknown} (grid file has: {', '.join(grid['methods'])})")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)  # gains and speed-ups are relative to FedAvg
    labels = {m: grid["methods"][m].get("label", m) for m in methods}
    target = args.target if args.target is not None else float(grid["datasets"][args.dataset]["target"])
    cells = select_cells(grid["axes"]["global_lr"]["values"], grid["axes"]["local_lr"]["values"], args.subset)
    out = Path(args.out or REPO / "runs" / "papers" / f"fedhyper-{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)

    from fedsim.engine import run_scenario
    from fedsim.scenario import config_sha256

    t0 = time.monotonic()
    results: dict[tuple[str, float, float], RunResult] = {}
    todo = [(g, l, m) for g, l in cells for m in methods]
    missing = 0
    for i, (g, l, m) in enumerate(todo, 1):
        scn = load_run(grid, args.dataset, m, g, l, args.rounds, args.engine, args.sets)
        run_dir = out / "runs" / m / cell_dirname(g, l)
        sha = config_sha256(scn)
        tag = f"[{i}/{len(todo)}] {args.dataset} {m} global={g:g} local={l:g}"
        res = read_result(run_dir, target, sha)
        if res is None and not args.report_only:
            if args.budget_min is not None and time.monotonic() - t0 > 60 * args.budget_min:
                print(f"{tag}: skipped (budget of {args.budget_min:g} min spent)", flush=True)
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an unfinished run or another config: start over
                t = time.monotonic()
                run_scenario(scn, run_dir, progress="none")
                res = read_result(run_dir, target, sha)
                print(f"{tag}: final {fmt_acc(res.final_accuracy)} % best {fmt_acc(res.best_accuracy)} % "
                      f"r@{100 * target:g}% {fmt_rounds(res.rounds_to_target)}  ({time.monotonic() - t:.0f} s)",
                      flush=True)
        elif res is not None:
            print(f"{tag}: done earlier, final {fmt_acc(res.final_accuracy)} %", flush=True)
        if res is None:
            missing += 1
        else:
            results[(m, g, l)] = res

    rows = build_rows(cells, methods, results)
    (out / "table.csv").write_text(table_csv(rows), encoding="utf-8")
    (out / "table.md").write_text(table_md(rows, methods, labels, target), encoding="utf-8")
    write_heatmaps(out, rows, methods, labels, args.dataset)
    command = "python benchmarks/papers/fedhyper.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "summary.md").write_text(summary_md(rows, methods, labels, dataset=args.dataset, target=target,
                                               rounds=args.rounds, command=command,
                                               wall_s=time.monotonic() - t0, missing=missing), encoding="utf-8")
    print(f"wrote {out}/table.md, table.csv, summary.md and {len(methods) * 2 - 1} heatmaps "
          f"({missing} run(s) missing) in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
