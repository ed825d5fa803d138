"""Results of a run: metrics sinks, summary, checkpoints, plots and reports.

A run directory holds ``metrics.jsonl``/``metrics.csv`` (one row per round),
``summary.json``, ``model.safetensors`` and ``plots/*.png``; this package writes and
reads all of them. Submodules are imported on first use, so reading metrics does not
pull in torch or matplotlib.

Example:
    >>> from fedsim.results import MetricsWriter, read_metrics  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsim.results.checkpoint import load_checkpoint, save_checkpoint
    from fedsim.results.metrics import MetricsWriter, read_metrics
    from fedsim.results.plots import plot_comparison, plot_run
    from fedsim.results.report import compare_runs, format_bytes, render_table
    from fedsim.results.summary import build_summary, read_json, rounds_to_target, write_json

_EXPORTS = {
    "MetricsWriter": "metrics",
    "read_metrics": "metrics",
    "build_summary": "summary",
    "rounds_to_target": "summary",
    "write_json": "summary",
    "read_json": "summary",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "plot_run": "plots",
    "plot_comparison": "plots",
    "compare_runs": "report",
    "render_table": "report",
    "format_bytes": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports the submodule that defines ``name`` on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
