"""Progress for long runs: a rich progress bar on a terminal, one log line per round elsewhere.

Example:
    >>> with RoundProgress(2, mode="none") as p:
    ...     p.update(1, {"eval_accuracy": 0.5})
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def format_duration(seconds: float) -> str:
    """A duration a person reads at a glance: seconds, then m:ss, h:mm:ss and days.

    Example:
        >>> [format_duration(s) for s in (4.25, 75, 3725, 2 * 86400 + 5, 3.2e12)]
        ['4.2s', '1:15', '1:02:05', '2d 0:00:05', 'more than 1000 years']
    """
    if not seconds == seconds or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds >= 1000 * 365.25 * 86400:
        return "more than 1000 years"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for key, label, pct in (("eval_accuracy", "acc", True), ("eval_loss", "loss", False),
                            ("train_loss", "train", False)):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and v == v:
            parts.append(f"{label} {100 * v:.1f}%" if pct else f"{label} {v:.3f}")
    if "clients" in metrics:
        parts.append(f"clients {metrics['clients']}")
    if metrics.get("rejected"):
        parts.append(f"[red]rejected {metrics['rejected']}[/red]")
    return "  ".join(parts)


class RoundProgress:
    """Shows round k/R, live accuracy/loss, clients this round and the ETA.

    ``mode``: ``rich`` (a live bar), ``log`` (a line per round, for files and CI), ``none``, or
    ``auto`` (rich on a terminal, else log).
    """

    def __init__(self, rounds: int, mode: str = "auto", console: Console | None = None):
        self.rounds = rounds
        self.console = console or Console(stderr=True)
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar: Progress | None = None
        self._task: Any = None
        self._start = time.perf_counter()

    def __enter__(self) -> "RoundProgress":
        if self.mode == "rich":
            self._bar = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task("rounds", total=self.rounds, info="")
        return self

    def note(self, text: str) -> None:
        """A one-off line (partition summary, warnings)."""
        if self.mode != "none":
            self.console.print(text, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """A line the user must see whatever the mode (a resume from an older checkpoint, say)."""
        self.console.print(f"[yellow]{text}[/yellow]", highlight=False, soft_wrap=True)

    def update(self, server_round: int, metrics: dict[str, Any]) -> None:
        """Record that ``server_round`` finished with ``metrics``."""
        if self._bar is not None:
            self._bar.update(self._task, completed=server_round, info=_fmt(metrics))
        elif self.mode == "log":
            elapsed = time.perf_counter() - self._start
            if server_round < 1:              # a stage before round 1 (AutoFLIP's exploration): no ETA yet
                self.console.print(f"round 0 (stage before round 1)  {_fmt(metrics)}  elapsed {format_duration(elapsed)}",
                                   highlight=False, soft_wrap=True)
                return
            eta = elapsed / server_round * (self.rounds - server_round)
            self.console.print(f"round {server_round}/{self.rounds}  {_fmt(metrics)}  "
                               f"elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}", highlight=False,
                               soft_wrap=True)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
