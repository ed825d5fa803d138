"""Per-round metrics sinks: ``metrics.jsonl`` (the record) and ``metrics.csv`` (for spreadsheets).

One JSON object per round is appended and flushed as soon as the round ends, so a
crashed run keeps every finished round; :func:`read_metrics` skips the half-written
last line such a crash can leave.

Example:
    >>> import tempfile
    >>> run_dir = tempfile.mkdtemp()
    >>> with MetricsWriter(run_dir) as w:
    ...     w.write({"round": 1, "eval_accuracy": 0.5, "train_loss": float("nan")})
    >>> read_metrics(run_dir)
    [{'round': 1, 'eval_accuracy': 0.5, 'train_loss': None}]
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fedsim.results.summary import to_jsonable
from fedsim.runtime.files import atomic_write_text

__all__ = ["CLIENTS_NAME", "JSONL_NAME", "CSV_NAME", "MetricsWriter", "read_metrics", "write_csv"]

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
#: One line per client per round it trained (round, client_id, num_examples, train_loss, ...).
CLIENTS_NAME = "clients.jsonl"


def _drop_partial_last_line(path: Path) -> None:
    """Truncates a trailing line without a newline (left by a crash) before appending."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        warnings.warn(
            f"{path}: dropping a truncated last line before appending: {data[keep:][:80]!r}",
            stacklevel=3,
        )
        f.truncate(keep)


class MetricsWriter:
    """Appends one JSON line per round to ``RUN_DIR/metrics.jsonl``.

    Values are made JSON-safe (NaN/inf -> null, numpy/torch scalars -> python).
    :meth:`close` (also on leaving the ``with`` block, even after an error) writes
    ``metrics.csv`` from every row in the file.

    Args:
        run_dir: The run directory; created if missing.
        append: Continue an existing file (resume) instead of starting a new one.
            A truncated last line left by a crash is dropped first.
        name: The JSONL file (``clients.jsonl`` for the per-client sink).
        csv_name: The CSV copy written on close (None: none).
    """

    def __init__(self, run_dir: str | Path, *, append: bool = False, name: str = JSONL_NAME,
                 csv_name: str | None = CSV_NAME) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / name
        self.csv_name = csv_name
        if append and self.path.exists():
            _drop_partial_last_line(self.path)
        self._file: IO[str] | None = open(
            self.path, "a" if append else "w", encoding="utf-8", newline="\n"
        )

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends one record as a JSON line and flushes it.

        Args:
            record: The round's metrics; must contain ``round``.

        Raises:
            ValueError: If the writer is closed or the record has no ``round``.
            TypeError: If the record is not a mapping or holds a value with no JSON form.
        """
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, got {type(record).__name__}")
        if "round" not in record:
            raise ValueError(f"metrics record has no 'round' key: {sorted(record)}")
        line = json.dumps(to_jsonable(record), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the JSONL file and writes ``metrics.csv``; safe to call twice."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.csv_name:
            write_csv(read_metrics(self.path), self.run_dir / self.csv_name)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _csv_cell(value: Any) -> Any:
    """Formats one value for CSV: None -> empty, nested data -> JSON text."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return value


def write_csv(rows: list[Mapping[str, Any]], path: str | Path) -> None:
    """Writes rows as CSV (atomically); columns are the union of keys in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _metrics_path(run_dir: str | Path, name: str) -> Path:
    """Accepts a run directory or the JSONL file itself."""
    path = Path(run_dir)
    return path / name if path.is_dir() else path


def read_metrics(run_dir: str | Path, name: str = JSONL_NAME) -> list[dict[str, Any]]:
    """Reads every record of a run's ``metrics.jsonl`` (or ``name``, e.g. ``clients.jsonl``).

    Args:
        run_dir: The run directory (or the path of the JSONL file).
        name: The file in the run directory.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: If there is no metrics file.
        ValueError: If a line other than the last one is not a JSON object.

    A last line that does not parse (a crash in the middle of a write) is skipped
    with a warning.
    """
    path = _metrics_path(run_dir, name)
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(i, ln) for i, ln in lines if ln.strip()]
    rows: list[dict[str, Any]] = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if pos < len(lines) - 1:
                raise ValueError(f"{path}:{lineno}: corrupt metrics line ({e})") from e
            warnings.warn(f"{path}:{lineno}: skipping truncated last line", stacklevel=2)
            continue
        rows.append(row)
    return rows

