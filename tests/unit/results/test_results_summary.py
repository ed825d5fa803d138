"""Tests for fedsim.results.summary: figures from hand-made rows and JSON files."""

from __future__ import annotations

import math

import pytest

from fedsim.results.summary import build_summary, read_json, write_json

ROWS = [
    {"round": 1, "eval_accuracy": None, "eval_loss": None, "train_loss": 2.0,
     "bytes_up": 100, "bytes_down": 200, "client_compute_s": 1.0},
    {"round": 2, "eval_accuracy": 0.6, "eval_loss": 1.1, "train_loss": 1.5,
     "bytes_up": 100, "bytes_down": 200, "client_compute_s": 1.5},
    {"round": 3, "eval_accuracy": 0.8, "eval_loss": 0.7, "train_loss": 1.0,
     "bytes_up": 100, "bytes_down": 200, "client_compute_s": None},
    {"round": 4, "eval_accuracy": 0.75, "eval_loss": 0.9, "train_loss": 0.9,
     "bytes_up": 100, "bytes_down": 200, "client_compute_s": 1.5},
]
META = dict(name="t", seed=7, config_sha256="abc", engine="inprocess", fedsim_version="0.1.0")


def test_figures_from_rows():
    s = build_summary(ROWS, wall_s=10.0, aggregate_s=1.0, targets=[0.7, 0.9], **META)
    assert s["final_accuracy"] == 0.75 and s["best_accuracy"] == 0.8 and s["best_round"] == 3
    assert s["final_loss"] == 0.9 and s["rounds_completed"] == 4
    assert s["client_compute_s"] == 4.0
    assert s["overhead_ratio"] == pytest.approx(10.0 / 5.0)
    assert (s["bytes_up"], s["bytes_down"]) == (400, 800)
    assert s["rounds_to_target"] == {"0.7": 3, "0.9": None}
    assert (s["seed"], s["config_sha256"], s["engine"], s["name"]) == (7, "abc", "inprocess", "t")


def test_no_eval_rows_and_zero_denominator():
    rows = [{"round": 1, "eval_accuracy": None, "train_loss": float("nan")}]
    s = build_summary(rows, wall_s=1.0, aggregate_s=0.0, **META)
    assert s["final_accuracy"] is None and s["best_accuracy"] is None and s["best_round"] is None
    assert s["final_loss"] is None and s["overhead_ratio"] is None
    assert build_summary([], wall_s=0.0, aggregate_s=0.0, **META)["rounds_completed"] == 0


def test_extra_merged_but_cannot_overwrite():
    s = build_summary(ROWS, wall_s=1.0, aggregate_s=1.0, extra={"epsilon": 3.2}, **META)
    assert s["epsilon"] == 3.2
    with pytest.raises(ValueError, match="final_accuracy"):
        build_summary(ROWS, wall_s=1.0, aggregate_s=1.0, extra={"final_accuracy": 1.0}, **META)


def test_write_json_atomic_roundtrip(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_json(path, {"b": 1, "a": math.nan})
    text = path.read_text()
    assert text.index('"b"') < text.index('"a"') and "\n  " in text
    assert read_json(path) == {"b": 1, "a": None}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_write_json_failure_leaves_no_tmp(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"bad": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_read_json_errors_name_the_path(tmp_path):
    (tmp_path / "a.json").write_text("[1]")
    (tmp_path / "b.json").write_text("{")
    with pytest.raises(ValueError, match="a.json"):
        read_json(tmp_path / "a.json")
    with pytest.raises(ValueError, match="b.json"):
        read_json(tmp_path / "b.json")
