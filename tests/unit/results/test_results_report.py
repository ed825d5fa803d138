"""Tests for fedsim.results.report: run comparison rows and the rich table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from fedsim.results.report import compare_runs, format_bytes, render_table
from fedsim.results.summary import build_summary, write_json


def _rows(n: int) -> list[dict]:
    return [{"round": r, "eval_accuracy": 0.2 * r if r != 2 else None, "eval_loss": None,
             "train_loss": 1.0, "bytes_up": 1024, "bytes_down": 2048, "wall_s": 1.5 * r,
             "client_compute_s": 1.0, "clients": 3} for r in range(1, n + 1)]


def _make_run(run_dir: Path, rounds: int, *, name: str | None, summary: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    rows = _rows(rounds)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        write_json(run_dir / "summary.json", build_summary(
            rows, name=name, seed=0, config_sha256="x", engine="inprocess",
            wall_s=rows[-1]["wall_s"], aggregate_s=0.5, fedsim_version="0.1.0"))
    return run_dir


def test_compare_two_runs(tmp_path):
    rows = compare_runs([_make_run(tmp_path / "a", 3, name="fedavg"),
                         _make_run(tmp_path / "b", 4, name="fedhyper")])
    assert [r["run"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["name"] == "fedavg" and a["engine"] == "inprocess" and a["status"] == "complete"
    assert a["final_accuracy"] == pytest.approx(0.6) and a["best_round"] == 3
    assert a["rounds_completed"] == 3 and a["wall_s"] == 4.5
    assert (a["bytes_up"], a["bytes_down"]) == (3072, 6144)
    assert b["best_accuracy"] == pytest.approx(0.8) and b["rounds_completed"] == 4


def test_crashed_run_is_incomplete(tmp_path):
    run = _make_run(tmp_path / "crashed", 3, name=None, summary=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "eval_')
    with pytest.warns(UserWarning):
        (row,) = compare_runs([run])
    assert row["status"] == "incomplete" and row["name"] == "crashed" and row["engine"] is None
    assert row["rounds_completed"] == 3 and row["best_round"] == 3 and row["wall_s"] == 4.5
    assert row["bytes_up"] == 3072


def test_not_a_run_dir(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="nothing"):
        compare_runs([tmp_path / "nothing"])


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_render_table(tmp_path):
    runs = [_make_run(tmp_path / "a", 3, name="fedavg"),
            _make_run(tmp_path / "b", 2, name="x", summary=False)]
    console = Console(record=True, width=200)
    console.print(render_table(compare_runs(runs)))
    text = console.export_text()
    for expected in ("fedavg", "60.00%", "4.5 s", "3.0 KiB", "6.0 KiB", "incomplete", "20.00%"):
        assert expected in text
