"""Heatmaps of a two-axis product sweep: final accuracy per method and gain over the baseline method.

Built with :class:`matplotlib.figure.Figure` on an explicit Agg canvas, never through ``pyplot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.sweep.grid import Grid, value_text
from fedsim.sweep.tables import CellRow, heat_values

__all__ = ["heatmap", "write_heatmaps"]


def heatmap(path: Path, matrix: Sequence[Sequence[float | None]], rows: Sequence[Any], cols: Sequence[Any], *,
            title: str, xlabel: str, ylabel: str, cbar: str, diverging: bool) -> Path:
    """One annotated heatmap PNG; ``None`` entries are grey, marked "not run". ``diverging``: a red-blue scale centred
    on 0 (gains), else viridis (accuracies)."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float).reshape(
        len(rows), len(cols))
    fig = Figure(figsize=(max(6.0, 1.2 * len(cols) + 2.4), max(3.4, 1.0 * len(rows) + 1.6)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = data[np.isfinite(data)]
    cmap = matplotlib.colormaps["RdBu" if diverging else "viridis"].with_extremes(bad="0.85")  # grey: not run
    if diverging:
        lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        im = ax.imshow(data, cmap=cmap, vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    else:
        im = ax.imshow(data, cmap=cmap, origin="lower", aspect="auto")
    ax.set_xticks(range(len(cols)), [value_text(c) for c in cols])
    ax.set_yticks(range(len(rows)), [value_text(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(data[i, j]):
                rgba = im.cmap(im.norm(data[i, j]))
                dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                ax.text(j, i, f"{data[i, j]:+.1f}" if diverging else f"{data[i, j]:.1f}", ha="center",
                        va="center", fontsize=8, color="white" if dark else "black")
            else:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="0.35")
    if not finite.size:
        ax.text(0.5, 0.5, "no finished cell", ha="center", va="center", transform=ax.transAxes)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_heatmaps(out: Path, rows: Sequence[CellRow], grid: Grid) -> list[Path]:
    """``heatmap_<method>.png`` (final accuracy, mean over seeds) for every method of the rows (``heatmap.png``
    without methods) and ``gain_<method>.png`` for every method but the baseline when the grid names one.
    Only for a product grid of exactly two axes; returns the files written."""
    if len(grid.axes) != 2 or grid.combine != "product":
        return []
    a, b = grid.axes
    seeds = sorted({r.cell.seed for r in rows})
    over = f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    written = []
    for m in dict.fromkeys(r.cell.method for r in rows):
        label = grid.label(m)
        acc, xs, ys = heat_values(rows, grid, m, "acc")
        name = f"heatmap_{m}.png" if m else "heatmap.png"
        who = f"{label} final" if m else "final"
        written.append(heatmap(out / name, acc, xs, ys, title=f"{grid.name}: {who} accuracy (%){over}",
                               xlabel=b.label, ylabel=a.label, cbar="accuracy %", diverging=False))
        if grid.baseline and m and m != grid.baseline:
            gain, xs, ys = heat_values(rows, grid, m, "gain")
            written.append(heatmap(out / f"gain_{m}.png", gain, xs, ys,
                                   title=f"{grid.name}: {label} gain over {grid.label(grid.baseline)} (points){over}",
                                   xlabel=b.label, ylabel=a.label, cbar="points", diverging=True))
    return written
