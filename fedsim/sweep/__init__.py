"""``fedsim sweep GRID.yaml``: many runs of one base scenario over a grid of ``--set`` overrides.

A grid file (plain YAML, read with ``yaml.safe_load``) names a base scenario, the axes to vary, optional
named methods and the seeds; every combination is a *cell*: one ``fedsim run`` of the base scenario with
the cell's overrides, trained in this process (``fedsim.engine.run_scenario``), one cell after another.

Grid file::

    name: fedhyper-fmnist            # optional; default: the grid file's name without .yaml
    scenario: ../../scenarios/papers/fedhyper/fmnist.yaml   # relative to THIS FILE's folder
    out: runs/papers/fedhyper-fmnist # optional; relative to the current folder; default runs/sweeps/<name>
    seeds: [0]                       # optional; each cell sets seed=<s>; default: the base scenario's seed
    target: 0.70                     # optional accuracy for rounds-to-target and speed-ups
    combine: product                 # product (default: every combination) | zip (i-th value of every axis)
    overrides: [data.options.max_test=2000]   # optional; set in every cell
    metrics: [lr_global]             # optional; last value of these per-round metrics, per cell
    axes:
      federation.local.lr: [0.01, 0.1]        # shorthand: the axis name is the scenario key
      global_lr:                              # long form
        label: global LR                      # table header and heatmap axis label
        keys: {fedavg: strategy.server_lr, default: lr_schedule.alpha0}   # per method (or key: one.key)
        values: [0.5, 1.0, 2.0]
    methods:                         # optional; each a list of overrides
      fedavg: {label: FedAvg, overrides: [strategy.name=fedavg]}
      fedhyper-g: {label: G, overrides: [lr_schedule.kind=fedhyper, lr_schedule.variant=g]}
    baseline: fedavg                 # optional; a method: gains and speed-ups are relative to it

A cell's overrides, in order: the grid's ``overrides``, its method's overrides, one ``key=value`` per
axis, ``seed=<s>``, then the command line's ``--set`` (so ``--set federation.rounds=15`` shortens every
cell). Cell ids are built from content, e.g. ``fedavg__global_lr=0.5__federation.local.lr=0.01__seed=0``,
so they stay the same when values are added to the grid. Cells run seed by seed, axis point by axis point,
every method of a point together.

Before any cell runs, the grid and EVERY cell's scenario are validated; all problems are listed at once
with their paths (exit 2): a typo in cell 17 never surfaces after 16 cells of training.

Resuming: run the same command again. A cell whose ``cells/<id>/summary.json`` carries this cell's config
hash is never re-run. A cell without ``summary.json`` (interrupted) is started over in its own folder, or
resumed from its latest checkpoint when the scenario writes checkpoints (``output.checkpoint_every``). A
finished cell of ANOTHER configuration (the base scenario or ``--set`` changed) is refused before anything
runs; ``--overwrite`` re-runs it. ``--budget-min N`` starts no new cell after N minutes (the running cell
finishes), says so and exits 0: run the same command again to continue.

Outputs in the sweep folder: ``cells/<id>/`` (fedsim run directories), ``sweep.json`` (every selected cell:
id, overrides, seed, status done|failed|pending|stale, final/best accuracy, rounds, rounds-to-target, wall
time, config hash), ``table.csv`` and ``table.md`` (one row per cell; with several seeds also the mean ±
std over seeds, and ``table_seeds.csv``), ``compare.md`` (methods side by side, gain and speed-up over the
baseline), ``heatmap_<method>.png`` and ``gain_<method>.png`` (product grids of exactly two axes),
``curves.png`` (accuracy per round, 2 to 12 finished cells). Tables and ``sweep.json`` describe the cells
this invocation selected (``--methods``, ``--subset``, ``--only``) and are rewritten after every cell.

Example:
    >>> grid = parse_grid("scenario: s.yaml\\nseeds: [0]\\naxes: {a: {key: federation.rounds, values: [1, 2]}}\\n"
    ...                   "methods: {x: [strategy.name=fedavg], y: [strategy.name=fedprox]}\\nbaseline: x\\n",
    ...                   base_dir=".", check_files=False)
    >>> [c.id for c in grid.cells()]
    ['x__a=1__seed=0', 'y__a=1__seed=0', 'x__a=2__seed=0', 'y__a=2__seed=0']
"""

from fedsim.sweep.grid import (
                                 Axis,
                                 Cell,
                                 Grid,
                                 GridError,
                                 Method,
                                 load_grid,
                                 parse_grid,
                                 select_cells,
                                 subset_indices,
)
from fedsim.sweep.run import Planned, Reporter, SweepOutcome, plan_cells, run_sweep
from fedsim.sweep.tables import (
                                 CellResult,
                                 CellRow,
                                 build_rows,
                                 fmt_acc,
                                 fmt_gain,
                                 fmt_rounds,
                                 gain_points,
                                 mean_std,
                                 speedup,
)

__all__ = ["Axis", "Cell", "CellResult", "CellRow", "Grid", "GridError", "Method", "Planned", "Reporter",
           "SweepOutcome", "build_rows", "fmt_acc", "fmt_gain", "fmt_rounds", "gain_points", "load_grid", "mean_std",
           "parse_grid", "plan_cells", "run_sweep", "select_cells", "speedup", "subset_indices"]
