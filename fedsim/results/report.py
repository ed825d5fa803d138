"""Side-by-side comparison of run directories, as rows and as a rich table.

A finished run is read from its ``summary.json``; a crashed run (no summary) is
rebuilt from whatever rounds reached ``metrics.jsonl`` and marked ``incomplete``.

Example:
    >>> from rich.console import Console
    >>> Console().print(render_table(compare_runs(["runs/a", "runs/b"])))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsim.results.metrics import JSONL_NAME, read_metrics
from fedsim.results.summary import accuracy_figures, read_json

__all__ = ["compare_runs", "config_differences", "format_bytes", "render_table"]

#: Config keys never shown as differences: the name is a column, output is where files went.
_NOT_DIFFERENCES = ("name", "output.")
#: At most this many differing keys become table columns (the rest are in ``--json``).
MAX_DIFF_COLUMNS = 6

SUMMARY_NAME = "summary.json"
_FIELDS = (
    "name", "engine", "final_accuracy", "best_accuracy", "best_round",
    "rounds_completed", "wall_s", "bytes_up", "bytes_down", "epsilon",
)  # fmt: skip
_MISSING = "-"


def _from_metrics(run_dir: Path) -> dict[str, Any]:
    """Derives the comparison figures of a crashed run from its metrics rows."""
    rows = read_metrics(run_dir)
    figures = accuracy_figures(rows)
    wall = [r["wall_s"] for r in rows if isinstance(r.get("wall_s"), (int, float))]
    return {
        **figures,
        "name": run_dir.resolve().name,
        "engine": None,
        "wall_s": max(wall, default=None),  # wall_s is cumulative
        "bytes_up": sum(r.get("bytes_up") or 0 for r in rows),
        "bytes_down": sum(r.get("bytes_down") or 0 for r in rows),
        "epsilon": next((r["epsilon_max"] for r in reversed(rows) if r.get("epsilon_max") is not None), None),
    }


def _compare_one(run_dir: Path) -> dict[str, Any]:
    """Returns one comparison row for a run directory."""
    if (run_dir / SUMMARY_NAME).is_file():
        source, status = read_json(run_dir / SUMMARY_NAME), "complete"
    elif (run_dir / JSONL_NAME).is_file():
        source, status = _from_metrics(run_dir), "incomplete"
    else:
        raise ValueError(f"{run_dir}: not a run directory (no {SUMMARY_NAME} or {JSONL_NAME})")
    row: dict[str, Any] = {"run": run_dir.resolve().name}
    row.update({key: source.get(key) for key in _FIELDS})
    row["name"] = row["name"] or row["run"]
    row["status"] = status
    return row


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _resolved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved scenario (``config.yaml``, read by the scenario loader), flattened to
    dotted keys; None when there is none or it no longer validates (an older fedsim's run)."""
    from fedsim.scenario import ScenarioError, load_scenario

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return _flat(load_scenario(path).model_dump(mode="json"))
    except (ScenarioError, OSError):
        return None


def config_differences(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Per run, the resolved config values in which the runs differ (dotted keys, sorted), so that
    runs of one scenario are told apart, e.g. ``{"data.partition.alpha": 0.1, "strategy.name": "fedavg"}``.

    Runs without a readable ``config.yaml`` get ``{}``; a key a run lacks counts as ``None``.
    """
    if len(run_dirs) < 2:                    # nothing to tell apart (a sweep reads its cells one by one)
        return [{} for _ in run_dirs]
    configs = [_resolved_config(Path(d)) for d in run_dirs]
    known = [c for c in configs if c is not None]
    if len(known) < 2:
        return [{} for _ in configs]
    keys = sorted({k for c in known for k in c if not k.startswith(_NOT_DIFFERENCES)})
    differ = [k for k in keys if len({repr(c.get(k)) for c in known}) > 1]
    return [{k: c.get(k) for k in differ} if c is not None else {} for c in configs]


def compare_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Collects the headline figures of several runs.

    Args:
        run_dirs: Run directories, each with a ``summary.json`` or at least a
            ``metrics.jsonl`` (a crashed run).

    Returns:
        One dict per run, in the given order, with ``run`` (directory name),
        ``name``, ``engine``, ``final_accuracy``, ``best_accuracy``, ``best_round``,
        ``rounds_completed``, ``wall_s``, ``bytes_up``, ``bytes_down`` and
        ``status`` (``"complete"``, or ``"incomplete"`` when derived from metrics), and
        ``config``: the resolved config values in which the runs differ (:func:`config_differences`).

    Raises:
        ValueError: If a directory has neither file, or a corrupt ``metrics.jsonl`` (the message names it).
    """
    rows = [_compare_one(Path(d)) for d in run_dirs]
    for row, diff in zip(rows, config_differences(run_dirs)):
        row["config"] = diff
    return rows


def format_bytes(n: float) -> str:
    """Formats a byte count with binary units.

    Example:
        >>> format_bytes(512), format_bytes(1536), format_bytes(3 * 2**20)
        ('512 B', '1.5 KiB', '3.0 MiB')
    """
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _percent(value: Any) -> str:
    return _MISSING if value is None else f"{100 * value:.2f}%"


def _seconds(value: Any) -> str:
    return _MISSING if value is None else f"{value:.1f} s"


def _bytes(value: Any) -> str:
    return _MISSING if value is None else format_bytes(value)


def _plain(value: Any) -> str:
    return _MISSING if value is None else str(value)


_COLUMNS = (  # (header, key, formatter, justify)
    ("run", "run", _plain, "left"),
    ("name", "name", _plain, "left"),
    ("engine", "engine", _plain, "left"),
    ("status", "status", _plain, "left"),
    ("final acc", "final_accuracy", _percent, "right"),
    ("best acc", "best_accuracy", _percent, "right"),
    ("best round", "best_round", _plain, "right"),
    ("rounds", "rounds_completed", _plain, "right"),
    ("wall", "wall_s", _seconds, "right"),
    ("up", "bytes_up", _bytes, "right"),
    ("down", "bytes_down", _bytes, "right"),
    ("ε (max)", "epsilon", lambda v: _MISSING if v is None else f"{v:.3g}", "right"),
)


def render_table(rows: list[Mapping[str, Any]]) -> Table:
    """Builds a rich table of :func:`compare_runs` rows in human units.

    Accuracy is shown as a percentage, bytes as B/KiB/MiB/GiB, seconds with one
    decimal; missing values as ``-``. Incomplete runs are dimmed.
    """
    table = Table(title="fedsim runs")
    columns = [c for c in _COLUMNS if c[1] != "epsilon" or any(r.get("epsilon") is not None for r in rows)]
    diff_keys = list(dict.fromkeys(k for r in rows for k in r.get("config", {})))[:MAX_DIFF_COLUMNS]
    for header, _, _, justify in columns:
        table.add_column(header, justify=justify)
    for key in diff_keys:                                   # what tells runs of one scenario apart
        table.add_column(key, justify="left")
    for row in rows:
        cells = [fmt(row.get(key)) for _, key, fmt, _ in columns]
        cells += [_plain(row.get("config", {}).get(key)) for key in diff_keys]
        table.add_row(*cells, style=None if row.get("status", "complete") == "complete" else "dim")
    return table
