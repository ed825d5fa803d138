"""PNG plots of a run (accuracy, losses, learning rates) and of several runs side by side.

Figures are built with :class:`matplotlib.figure.Figure` on an explicit Agg canvas,
never through ``pyplot``: no global figure registry, no backend switch, safe in
worker threads and in a notebook that has its own backend.

Example:
    >>> plot_run("runs/quickstart")  # doctest: +SKIP
    [PosixPath('runs/quickstart/plots/accuracy.png'), PosixPath('runs/quickstart/plots/loss.png')]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedsim.results.metrics import read_metrics
from fedsim.results.summary import read_json

__all__ = ["plot_comparison", "plot_run", "run_name"]

_DPI = 120
_SIZE = (6.4, 4.0)


def run_name(run_dir: str | Path) -> str:
    """Returns the run's name from ``summary.json``, else the directory name.

    ``config.yaml`` is not parsed here: the scenario schema is the only YAML reader.
    """
    run_dir = Path(run_dir)
    try:
        name = read_json(run_dir / "summary.json").get("name")
    except (OSError, ValueError):
        name = None
    return str(name) if name else run_dir.resolve().name


def _series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Returns ``(rounds, values)`` for the rows where ``key`` holds a finite number."""
    xs: list[int] = []
    ys: list[float] = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(row.get("round", len(xs) + 1)))
            ys.append(float(value))
    return xs, ys


def _new_axes(title: str, ylabel: str) -> tuple[Figure, Axes]:
    """Creates a figure on its own Agg canvas with one labelled axes."""
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _draw(ax: Axes, rows: list[Mapping[str, Any]], keys: Iterable[str], labels: Iterable[str | None],
          scale: float = 1.0) -> None:
    """Plots one line per key that has data (with markers when the line is short); ``scale``
    multiplies the values (100: accuracy in %, as the console prints it)."""
    for key, label in zip(keys, labels):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, [scale * y for y in ys], marker="o" if len(xs) <= 30 else None, markersize=3, label=label)


def _save(fig: Figure, ax: Axes, path: Path) -> Path:
    """Adds a legend when lines are labelled (or a 'no data' note when none) and writes the PNG."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend()
    if not ax.lines:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _lr_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Returns the ``lr_*`` keys that hold at least one number, in first-seen order."""
    keys = dict.fromkeys(k for row in rows for k in row if k.startswith("lr_"))
    return [k for k in keys if _series(rows, k)[0]]


def _lr_plot(rows: list[Mapping[str, Any]], keys: list[str], name: str, path: Path) -> Path:
    """``lr.png``: the server LR (``lr_global``, ~1) and the client LRs (~0.01-0.1) on panels of
    their own, so that neither looks flat on the other's scale."""
    server = [k for k in keys if "global" in k or "server" in k]
    client = [k for k in keys if k not in server]
    panels = [(title, ks) for title, ks in (("server learning rate", server), ("client learning rate", client)) if ks]
    fig = Figure(figsize=(_SIZE[0] * len(panels), _SIZE[1]), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ks) in zip(axes, panels):
        ax.set_title(f"{name}: {title}")
        ax.set_xlabel("round")
        ax.set_ylabel("learning rate")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        _draw(ax, rows, ks, [k.removeprefix("lr_") for k in ks])
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _varies(rows: list[Mapping[str, Any]], keys: list[str]) -> bool:
    return any(len(set(_series(rows, k)[1])) > 1 for k in keys)


def plot_run(run_dir: str | Path, lr_schedule: bool | None = None) -> list[Path]:
    """Writes the plots of one run under ``RUN_DIR/plots/``.

    ``accuracy.png`` (eval accuracy in % vs round) and ``loss.png`` (train and eval loss
    vs round) are always written; ``lr.png`` (server and client LR, one panel each) only
    when an LR schedule is active: ``lr_schedule`` says so (the run knows), or, when it is
    None, some ``lr_*`` series changes over the run. Rounds without a value (e.g. no
    evaluation) are skipped.

    Args:
        run_dir: A run directory with a ``metrics.jsonl``.
        lr_schedule: whether the run had an LR schedule (None: judge from the rows).

    Returns:
        The files written.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    name, out = run_name(run_dir), run_dir / "plots"
    fig, ax = _new_axes(f"{name}: eval accuracy", "accuracy (%)")
    _draw(ax, rows, ["eval_accuracy"], [None], scale=100.0)
    written = [_save(fig, ax, out / "accuracy.png")]
    fig, ax = _new_axes(f"{name}: loss", "loss")
    _draw(ax, rows, ["train_loss", "eval_loss"], ["train", "eval"])
    written.append(_save(fig, ax, out / "loss.png"))
    lr_keys = _lr_keys(rows)
    if lr_keys and (lr_schedule if lr_schedule is not None else _varies(rows, lr_keys)):
        written.append(_lr_plot(rows, lr_keys, name, out / "lr.png"))
    else:
        (out / "lr.png").unlink(missing_ok=True)            # from an earlier run in this folder
    if _series(rows, "epsilon_max")[0]:
        written.append(_privacy_plot(rows, name, out / "privacy.png"))
    return written


def _privacy_plot(rows: list[Mapping[str, Any]], name: str, path: Path) -> Path:
    """``privacy.png``: ε (max and mean over clients) vs round, and accuracy vs ε."""
    fig = Figure(figsize=(_SIZE[0] * 2, _SIZE[1]), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.set_title(f"{name}: privacy spent")
    left.set_xlabel("round")
    left.set_ylabel("epsilon")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    _draw(left, rows, ["epsilon_max", "epsilon_mean"], ["max over clients", "mean over clients"])
    left.legend()
    right.set_title(f"{name}: accuracy vs epsilon")
    right.set_xlabel("epsilon (max over clients)")
    right.set_ylabel("accuracy (%)")
    pairs = [(r["epsilon_max"], 100 * r["eval_accuracy"]) for r in rows
             if isinstance(r.get("epsilon_max"), (int, float)) and isinstance(r.get("eval_accuracy"), (int, float))]
    if pairs:
        right.plot(*zip(*pairs), marker="o", markersize=3)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _labels(run_dirs: list[Path], differences: list[Mapping[str, Any]] | None = None) -> list[str]:
    """Run names for a legend; names shared by several runs get what tells them apart: the
    config keys in which they differ (``differences``, one mapping per run), else the directory."""
    names = [run_name(d) for d in run_dirs]
    counts = Counter(names)
    out = []
    for i, (n, d) in enumerate(zip(names, run_dirs)):
        diff = differences[i] if differences else {}
        tag = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in diff.items()) if diff else d.name
        out.append(n if counts[n] == 1 else f"{n} ({tag})")
    return out


def plot_comparison(run_dirs: list[str | Path], out_path: str | Path,
                    differences: list[Mapping[str, Any]] | None = None) -> Path:
    """Plots eval accuracy (%) vs round for several runs on one figure.

    Args:
        run_dirs: Run directories, each with a ``metrics.jsonl``.
        out_path: PNG file to write; its folder is created if missing.
        differences: per run, the config values in which the runs differ (legend labels for
            runs that share a name; :func:`fedsim.results.report.config_differences`).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If a directory has no ``metrics.jsonl`` (names the path).
    """
    dirs = [Path(d) for d in run_dirs]
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        raise ValueError(f"no metrics.jsonl in: {', '.join(missing)}")
    fig, ax = _new_axes("eval accuracy by run", "accuracy (%)")
    for run_dir, label in zip(dirs, _labels(dirs, differences)):
        _draw(ax, read_metrics(run_dir), ["eval_accuracy"], [label], scale=100.0)
    return _save(fig, ax, Path(out_path))
