"""Tests for fedsim.results.plots: PNG files written, with and without eval rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.results.plots import plot_comparison, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _make_run(run_dir: Path, name: str | None, *, lr: bool = False, rounds: int = 5) -> Path:
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in range(1, rounds + 1):
            evaluated = r % 2 == 0
            row = {"round": r, "eval_accuracy": 0.1 * r if evaluated else None,
                   "eval_loss": 1.0 / r if evaluated else None, "train_loss": 2.0 / r}
            if lr:
                row.update(lr_global=0.1 * r, lr_local_mean=0.01)
            f.write(json.dumps(row) + "\n")
    if name:
        (run_dir / "summary.json").write_text(json.dumps({"name": name}))
    return run_dir


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024


def test_plot_run_with_lr_and_missing_eval(tmp_path):
    run = _make_run(tmp_path / "r1", "demo", lr=True)
    files = plot_run(run)
    assert [p.name for p in files] == ["accuracy.png", "loss.png", "lr.png"]
    for p in files:
        assert p.parent == run / "plots"
        _assert_png(p)


def test_plot_run_without_lr_or_any_eval(tmp_path):
    run = _make_run(tmp_path / "r2", None, rounds=1)
    files = plot_run(run)
    assert [p.name for p in files] == ["accuracy.png", "loss.png"]
    for p in files:
        _assert_png(p)
    assert not (run / "plots" / "lr.png").exists()


def test_plot_comparison(tmp_path):
    runs = [_make_run(tmp_path / "a", "fedavg"), _make_run(tmp_path / "b", "fedhyper")]
    out = plot_comparison(runs, tmp_path / "cmp" / "accuracy.png")
    assert out == tmp_path / "cmp" / "accuracy.png"
    _assert_png(out)


def test_plot_comparison_missing_metrics_names_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        plot_comparison([tmp_path / "empty"], tmp_path / "x.png")


def test_plots_never_use_pyplot(tmp_path):
    """plot_run draws with matplotlib's object API: pyplot (global figures, a GUI backend) is never
    imported, so plotting in a worker or a server thread leaks nothing (checked in a fresh process)."""
    import subprocess
    import sys

    run = _make_run(tmp_path / "r", "x", lr=True)
    code = ("import sys; from fedsim.results.plots import plot_run, plot_comparison; "
            f"plot_run({str(run)!r}); plot_comparison([{str(run)!r}], {str(tmp_path / 'c.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'; "
            "assert 'matplotlib' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _assert_png(tmp_path / "c.png")
