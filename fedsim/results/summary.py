"""Run summaries and the JSON files of a run directory.

``summary.json`` is the one-look answer to "how did this run go": final and best
accuracy, time, bytes and the provenance (seed, config hash, version, engine) that
makes the run reproducible. Every figure in it is computed from the per-round
metrics rows the run loop wrote, never assumed.

Example:
    >>> rows = [{"round": 1, "eval_accuracy": 0.5, "client_compute_s": 2.0}]
    >>> s = build_summary(rows, name="demo", seed=0, config_sha256="ab", engine="inprocess",
    ...                   wall_s=3.0, aggregate_s=1.0, fedsim_version="0.1.0")
    >>> s["final_accuracy"], s["overhead_ratio"]
    (0.5, 1.0)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsim.runtime.files import atomic_write_text

__all__ = [
    "accuracy_figures",
    "build_summary",
    "read_json",
    "rounds_to_target",
    "to_jsonable",
    "write_json",
]


def to_jsonable(value: Any) -> Any:
    """Converts a value to plain JSON types: NaN/inf become None, numpy/torch to python.

    Args:
        value: A scalar, mapping, sequence, numpy/torch scalar or array, or path.

    Returns:
        The same data made of ``dict``, ``list``, ``str``, ``int``, ``float``,
        ``bool`` and ``None`` only.

    Raises:
        TypeError: For a value with no JSON form (a set, an arbitrary object).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars/arrays, torch tensors
        return to_jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"value of type {type(value).__name__} has no JSON form: {value!r}")


def write_json(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically; NaN/inf are written as null.

    Args:
        path: Destination file; its folder is created if missing.
        obj: Data accepted by :func:`to_jsonable`. Key order is kept.
    """
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Reads a JSON object from ``path``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not valid JSON or not a JSON object (names the path).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _number(value: Any) -> float | None:
    """Returns ``value`` as a finite float, or None for missing/NaN/non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _total(rows: Iterable[Mapping[str, Any]], key: str) -> float:
    """Sums ``key`` over rows, treating missing or null values as 0."""
    return sum(_number(r.get(key)) or 0.0 for r in rows)


def _eval_points(rows: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """Returns ``(round, eval_accuracy)`` for the rows that were evaluated."""
    points = []
    for r in rows:
        acc = _number(r.get("eval_accuracy"))
        if acc is not None:
            points.append((int(r.get("round", 0)), acc))
    return points


def _last(rows: list[Mapping[str, Any]], key: str) -> float | None:
    """Returns the last non-null value of ``key``, or None."""
    for r in reversed(rows):
        value = _number(r.get(key))
        if value is not None:
            return value
    return None


def accuracy_figures(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Computes final/best accuracy, best round, final losses and rounds completed.

    Accuracy figures are None when no row carries an ``eval_accuracy``; the best
    round is the earliest round reaching the best accuracy.
    """
    points = _eval_points(rows)
    best_round, best = max(points, key=lambda p: (p[1], -p[0])) if points else (None, None)
    return {
        "final_accuracy": points[-1][1] if points else None,
        "best_accuracy": best,
        "best_round": best_round,
        "final_loss": _last(rows, "eval_loss"),
        "final_train_loss": _last(rows, "train_loss"),
        "rounds_completed": max((int(r.get("round", 0)) for r in rows), default=0),
    }


def rounds_to_target(rows: list[Mapping[str, Any]], targets: Iterable[float]) -> dict[str, int | None]:
    """Returns, per target accuracy, the first round whose eval accuracy reaches it.

    Keys are the targets written with ``%g`` (``0.9`` -> ``"0.9"``); a target never
    reached maps to None.
    """
    points = _eval_points(rows)
    return {
        f"{t:g}": next((rnd for rnd, acc in points if acc >= t), None) for t in targets
    }


def build_summary(
    rows: list[dict],
    *,
    name: str,
    seed: int,
    config_sha256: str,
    engine: str,
    wall_s: float,
    aggregate_s: float,
    fedsim_version: str,
    extra: dict | None = None,
    targets: Iterable[float] = (),
) -> dict:
    """Builds the ``summary.json`` content from a run's metrics rows.

    Args:
        rows: Per-round metrics records (as written to ``metrics.jsonl``).
        name: Run name.
        seed: Root seed of the run.
        config_sha256: Hash of the resolved configuration.
        engine: Engine that ran the federation (``inprocess``, ``workers`` ...).
        wall_s: Total wall-clock seconds of the run.
        aggregate_s: Total seconds the server spent aggregating.
        fedsim_version: Version of fedsim that produced the run.
        extra: More keys to record (e.g. epsilon); must not collide with computed keys.
        targets: Accuracy targets for the optional ``rounds_to_target`` mapping.

    Returns:
        The summary dict; ``overhead_ratio`` is ``wall_s / (client_compute_s +
        aggregate_s)``, or None when that denominator is 0.

    Raises:
        ValueError: If a key of ``extra`` would overwrite a computed figure.
    """
    compute_s = _total(rows, "client_compute_s")
    busy_s = compute_s + float(aggregate_s)
    summary: dict[str, Any] = {"name": name, **accuracy_figures(rows)}
    summary.update(
        wall_s=float(wall_s),
        client_compute_s=compute_s,
        aggregate_s=float(aggregate_s),
        overhead_ratio=float(wall_s) / busy_s if busy_s > 0 else None,
        bytes_up=int(_total(rows, "bytes_up")),
        bytes_down=int(_total(rows, "bytes_down")),
        seed=seed,
        config_sha256=config_sha256,
        fedsim_version=fedsim_version,
        engine=engine,
    )
    targets = list(targets)
    if targets:
        summary["rounds_to_target"] = rounds_to_target(rows, targets)
    clash = sorted(set(extra or {}) & set(summary))
    if clash:
        raise ValueError(f"extra keys would overwrite computed summary figures: {clash}")
    summary.update(extra or {})
    return to_jsonable(summary)
