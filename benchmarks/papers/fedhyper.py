"""FedHyper robustness grid: FedAvg vs FedHyper over initial global LR x initial local LR.

Reproduces the *shape* of the paper's Fig. 4 experiment (arXiv:2310.03156; see
shared/specs/fedhyper.md §3). A thin layer over ``fedsim sweep`` (``fedsim/sweep/``): the grids are
the sweep files ``benchmarks/papers/fedhyper_fmnist.yaml`` and ``fedhyper_shakespeare.yaml``; this
script keeps the command lines of benchmarks/papers/RESULTS.md working and adds ``summary.md``.

Usage (the "10-minute version" on 2 CPUs; see benchmarks/papers/RESULTS.md)::

    python benchmarks/papers/fedhyper.py --dataset fmnist --subset 3 --rounds 15 \\
        --methods fedavg,fedhyper-g+cl --out runs/papers/fedhyper-fmnist

which is ``fedsim sweep benchmarks/papers/fedhyper_fmnist.yaml --subset 3 --set federation.rounds=15
--methods fedavg,fedhyper-g+cl --out runs/papers/fedhyper-fmnist`` plus ``summary.md``.

Runs are resumable (a cell whose ``summary.json`` carries the same config hash is skipped);
``--report-only`` rewrites the tables/plots from the runs already on disk. Runs of the earlier
layout of this script (``<out>/runs/<method>/g<global>_l<local>/``) are moved to ``<out>/cells/<id>/``
on the first invocation, so their tables regenerate unchanged.

Outputs in ``--out``: those of ``fedsim sweep`` (``cells/<id>/``, ``sweep.json``, ``table.csv``,
``table.md``, ``compare.md`` — the table of RESULTS.md —, ``heatmap_<method>.png``, ``gain_<method>.png``)
and ``summary.md`` (per method over the cells: mean/max/min gain, wins/losses, speed-ups).

Definitions: see :mod:`fedsim.sweep.tables` (final accuracy, gain, rounds to target, speed-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "benchmarks" / "papers"
GRIDS = {"fmnist": HERE / "fedhyper_fmnist.yaml", "shakespeare": HERE / "fedhyper_shakespeare.yaml"}


# ----------------------------------------------------------------------------- paper summary
def _cell(row: Any) -> tuple[Any, Any]:
    v = row.cell.values
    return v["global_lr"], v["local_lr"]


def method_summary(rows: Sequence[Any], method: str) -> dict[str, Any]:
    """Aggregates over the cells of one method (vs the baseline): mean/max/min gain, wins, speed-ups.

    ``rows``: :class:`fedsim.sweep.CellRow` of a grid with ``global_lr`` and ``local_lr`` axes.
    """
    mine = [r for r in rows if r.cell.method == method and r.gain is not None]
    out: dict[str, Any] = {"method": method, "cells": len(mine)}
    if not mine:
        return out
    gains = [r.gain for r in mine]
    best = max(mine, key=lambda r: r.gain)
    worst = min(mine, key=lambda r: r.gain)
    ups = [r.speedup for r in mine if r.speedup is not None]
    out.update(mean_gain=statistics.fmean(gains), max_gain=best.gain, max_gain_cell=_cell(best),
               min_gain=worst.gain, min_gain_cell=_cell(worst),
               wins=sum(g > 0.5 for g in gains), losses=sum(g < -0.5 for g in gains),
               both_reached=len(ups), median_speedup=statistics.median(ups) if ups else None,
               min_speedup=min(ups) if ups else None, max_speedup=max(ups) if ups else None,
               only_method=sum(r.speedup_text.startswith(">") for r in mine),
               only_baseline=sum(r.speedup_text == "never" for r in mine))
    return out


def summary_md(rows: Sequence[Any], methods: Sequence[str], labels: Mapping[str, str], *, dataset: str,
               baseline: str, target: float, rounds: int | None, command: str, wall_s: float, missing: int) -> str:
    lines = [f"# FedHyper robustness grid: {dataset}", "",
             f"- command: `{command}`",
             (f"- rounds per run: {rounds if rounds is not None else 'scenario default'}; target accuracy "
             f"{100 * target:g} %; cells: {len({_cell(r) for r in rows})}; methods: {', '.join(methods)}"),
             f"- wall time of this invocation: {wall_s / 60:.1f} min; runs missing: {missing}", ""]
    base = [r for r in rows if r.cell.method == baseline and r.result is not None
            and r.result.final_accuracy is not None]
    if base:
        accs = [100 * r.result.final_accuracy for r in base]
        lines.append(f"FedAvg final accuracy across the cells: {min(accs):.1f}–{max(accs):.1f} %.")
        lines.append("")
    lines += [("| method | cells | mean gain pts | max gain (cell g/l) | min gain (cell g/l) | wins/losses (>0.5 pt) "
              "| speed-up median [min, max] (both reached) | only method / only FedAvg reached |"),
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        if m == baseline:
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
    lines += ["", ("Paper's claims (spec §3, not targets): 1.1–3x fewer rounds to a target accuracy; up to +15 "
              "points at poor initial LRs."), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the earlier layout
def legacy_dir(out: Path, method: str, global_lr: float, local_lr: float) -> Path:
    """Where the earlier version of this script kept a run: ``<out>/runs/<method>/g<global>_l<local>``."""
    return out / "runs" / method / f"g{global_lr:g}_l{local_lr:g}"


def adopt_legacy_runs(out: Path, cells: Sequence[Any]) -> int:
    """Move the finished runs of the earlier layout to ``cells/<id>/`` (where the cell has no folder yet).

    A moved run is then checked like any cell: skipped when its config hash is the cell's, refused
    (``--overwrite`` re-runs it) when not. Returns how many were moved.
    """
    moved = 0
    for c in cells:
        v = c.values
        old = legacy_dir(out, c.method, v["global_lr"], v["local_lr"])
        new = out / "cells" / c.id
        if (old / "summary.json").is_file() and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            old.rename(new)
            moved += 1
    for d in sorted((out / "runs").glob("*"), reverse=True) if (out / "runs").is_dir() else []:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    if (out / "runs").is_dir() and not any((out / "runs").iterdir()):
        (out / "runs").rmdir()
    return moved


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fmnist",
                   help=f"which grid file ({' | '.join(sorted(GRIDS))}); with --grid only the name in summary.md")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds of every run (default: scenario's)")
    p.add_argument("--subset", type=int, default=None,
                   help="K: run the K x K corner+centre cells of the 5x5 grid (3 -> {0.5,1,2} x {0.001,0.01,0.1})")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all of the grid file)")
    p.add_argument("--out", default=None, help="output folder (default runs/papers/fedhyper-<dataset>)")
    p.add_argument("--engine", choices=["inprocess", "workers"], default=None, help="engine.kind override")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra scenario override for every run (repeatable)")
    p.add_argument("--target", type=float, default=None, help="target accuracy (default: the grid file's)")
    p.add_argument("--grid", default=None, help="the sweep grid YAML (default: the dataset's)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no new run after this many minutes; tables cover what finished")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables/plots from finished runs")
    p.add_argument("--overwrite", action="store_true", help="re-run cells that hold a run of another configuration")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import dataclasses

    from fedsim.runtime.files import atomic_write_text
    from fedsim.sweep import GridError, load_grid, run_sweep

    args = parse_args(argv)
    t0 = time.monotonic()
    extra = ([f"federation.rounds={int(args.rounds)}"] if args.rounds is not None else []) \
        + ([f"engine.kind={args.engine}"] if args.engine else []) + list(args.sets)
    methods = args.methods.split(",") if args.methods else None
    if args.grid is None and args.dataset not in GRIDS:
        print(f"unknown dataset '{args.dataset}' (known: {', '.join(sorted(GRIDS))}; or pass --grid FILE)",
              file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "runs" / "papers" / f"fedhyper-{args.dataset}")
    try:
        grid = load_grid(args.grid or GRIDS[args.dataset], extra=extra)
        if args.target is not None:
            grid = dataclasses.replace(grid, target=args.target)
        moved = adopt_legacy_runs(out, grid.cells())
        if moved:
            print(f"moved {moved} finished run(s) of the earlier layout (runs/<method>/g<G>_l<L>/) to "
                  f"{out}/cells/<id>/", file=sys.stderr, flush=True)
        outcome = run_sweep(grid, out=out, methods=methods, subset=args.subset, budget_min=args.budget_min,
                            report_only=args.report_only, overwrite=args.overwrite)
    except GridError as exc:
        print(exc, file=sys.stderr)
        return 2
    rows = outcome.rows
    shown = list(dict.fromkeys(r.cell.method for r in rows))
    labels = {m.name: m.label for m in grid.methods}
    command = "python benchmarks/papers/fedhyper.py " + " ".join(sys.argv[1:] if argv is None else argv)
    missing = sum(r.result is None for r in rows)
    atomic_write_text(out / "summary.md", summary_md(rows, shown, labels, dataset=args.dataset, baseline=grid.baseline,
                                                     target=grid.target, rounds=args.rounds, command=command,
                                                     wall_s=time.monotonic() - t0, missing=missing))
    print(f"wrote {out}/compare.md (the RESULTS.md table), summary.md, table.md, table.csv and heatmaps "
          f"({missing} run(s) missing)", flush=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
