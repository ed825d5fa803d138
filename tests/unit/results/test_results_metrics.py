"""Tests for fedsim.results.metrics: JSONL/CSV round-trips and crash tolerance."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fedsim.results.metrics import MetricsWriter, read_metrics


def test_roundtrip_nan_and_numpy(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write({"round": np.int64(1), "eval_accuracy": np.float32(0.5), "eval_loss": float("nan"),
                 "train_loss": np.float64(math.inf), "ok": np.bool_(True), "v": np.arange(2)})
    rows = read_metrics(tmp_path)
    assert rows == [{"round": 1, "eval_accuracy": 0.5, "eval_loss": None, "train_loss": None,
                     "ok": True, "v": [0, 1]}]
    assert type(rows[0]["round"]) is int
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_each_write_is_flushed(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"round": 1, "eval_accuracy": 0.1})
    assert read_metrics(tmp_path) == [{"round": 1, "eval_accuracy": 0.1}]
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write({"round": 2})


def test_rejects_record_without_round(tmp_path):
    with MetricsWriter(tmp_path) as w, pytest.raises(ValueError, match="round"):
        w.write({"eval_accuracy": 0.1})


def test_truncated_last_line_is_skipped_with_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "eval_accuracy": 0.2}\n{"round": 2, "eval_acc')
    with pytest.warns(UserWarning, match="truncated"):
        rows = read_metrics(tmp_path)
    assert rows == [{"round": 1, "eval_accuracy": 0.2}]


def test_corrupt_middle_line_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{oops\n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_append_after_crash_drops_partial_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "tra')
    with pytest.warns(UserWarning, match="truncated"):
        w = MetricsWriter(tmp_path, append=True)
    with w:
        w.write({"round": 2, "train_loss": 1.0})
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]


def test_csv_union_of_keys_in_first_seen_order(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write({"round": 1, "eval_accuracy": None, "train_loss": 2.0})
        w.write({"round": 2, "eval_accuracy": 0.7, "lr_global": 0.1, "rejected": {"c3": "nan"}})
    with open(tmp_path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["round", "eval_accuracy", "train_loss", "lr_global", "rejected"]
    assert rows[0] == {"round": "1", "eval_accuracy": "", "train_loss": "2.0",
                       "lr_global": "", "rejected": ""}
    assert json.loads(rows[1]["rejected"]) == {"c3": "nan"}
