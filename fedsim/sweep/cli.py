"""``fedsim sweep GRID.yaml``: registered in ``fedsim/cli.py`` with :func:`add_sweep_parser` and
:func:`run_sweep_command`.

Exit codes: 0 done (also when ``--budget-min`` stopped it: the sweep is then incomplete and says how to
continue), 1 a cell failed to train, 2 bad input (grid, a cell's scenario, flags, a finished run of another
configuration in a cell's folder), 130 interrupted.
"""

from __future__ import annotations

import argparse
from typing import Any

EXIT_USAGE = 2

EPILOG = """\
grid file (paths: scenario relative to the grid file, out relative to the current folder):

  scenario: ../scenarios/quickstart.yaml
  seeds: [0, 1]
  target: 0.9                      # rounds-to-target and speed-ups
  axes:
    federation.local.lr: [0.01, 0.05]
    rounds: {key: federation.rounds, label: rounds, values: [5, 10]}
  methods:                         # optional, each a list of overrides
    fedavg: [strategy.name=fedavg]
    fedprox: {label: FedProx, overrides: [strategy.name=fedprox, strategy.proximal_mu=0.01]}
  baseline: fedavg                 # gains / speed-ups over it
  # also: name, out, combine: product|zip, overrides: [k=v] (every cell), metrics: [lr_global],
  #       an axis' per-method keys: {keys: {fedavg: strategy.server_lr, default: lr_schedule.alpha0}}

every cell is validated before any runs; a cell with cells/<id>/summary.json of the same config is
never re-run; an interrupted cell starts over (or resumes from its checkpoints); run the same command
again to continue. Outputs: cells/<id>/, sweep.json, table.csv, table.md, compare.md, heatmaps.
Full reference: python -c "import fedsim.sweep; help(fedsim.sweep)"
"""


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` command to ``fedsim``'s subparsers."""
    p = subparsers.add_parser(
        "sweep", help="run a grid of scenario overrides (resumable), then tables and heatmaps",
        description="Run every cell of a grid file (a base scenario x axes of --set overrides x methods x seeds) "
                    "one after another in this process; finished cells are never re-run.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="the grid YAML file")
    p.add_argument("--out", help="sweep folder (default: the grid's out, else runs/sweeps/<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario value in every cell, applied last (repeatable); part of each "
                        "cell's config hash")
    p.add_argument("--methods", help="comma-separated methods to run (the baseline is always added)")
    p.add_argument("--subset", type=int, metavar="K",
                   help="K evenly spread values per axis, ends first (3 of 5 -> first, middle, last)")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="only the cells whose id matches this glob, e.g. 'fedavg__*' or '*seed=1' (repeatable)")
    p.add_argument("--budget-min", type=float, metavar="N",
                   help="start no new cell after N minutes (the running one finishes); exit 0, incomplete")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells and their state; run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; rewrite sweep.json, tables and plots from the cells on disk")
    p.add_argument("--overwrite", action="store_true",
                   help="re-run cells whose folder holds a finished run of another configuration")
    p.add_argument("--target", type=float, help="target accuracy for rounds-to-target (default: the grid's)")
    return p


def run_sweep_command(args: argparse.Namespace, console: Any) -> int:
    """Run ``fedsim sweep`` for parsed ``args``; ``console`` (rich, stderr) prints the errors."""
    import dataclasses

    from fedsim.sweep.grid import GridError, load_grid
    from fedsim.sweep.run import run_sweep

    def fail(text: str) -> int:
        console.print(text, highlight=False, markup=False)
        return EXIT_USAGE

    if args.budget_min is not None and args.budget_min <= 0:
        return fail(f"--budget-min must be > 0 (got {args.budget_min:g})")
    if args.target is not None and not 0 < args.target <= 1:
        return fail(f"--target must be an accuracy in (0, 1] (got {args.target:g})")
    if args.dry_run and args.report_only:
        return fail("--dry-run and --report-only exclude each other")
    try:
        grid = load_grid(args.grid, extra=args.overrides)
        if args.target is not None:
            grid = dataclasses.replace(grid, target=args.target)
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        outcome = run_sweep(grid, out=args.out, methods=methods, subset=args.subset, only=args.only,
                            budget_min=args.budget_min, dry_run=args.dry_run, report_only=args.report_only,
                            overwrite=args.overwrite)
    except GridError as exc:
        return fail(str(exc))
    return outcome.exit_code
