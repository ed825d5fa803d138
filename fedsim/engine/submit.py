"""Submitting a fedsim run to a SuperLink: a code-free app bundle (FAB) through the Control API.

The FAB holds only a generated ``pyproject.toml`` whose components point at the
installed ``server.app:app`` and ``clients.app:app``, and whose run config carries the
resolved scenario. ``flwr run`` is not used: it exits 0 even when a run failed, so fedsim
polls the run status itself. Uses Flower internals listed in ``fedsim/flower/compat.py``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Callable

import tomli_w

from fedsim.flower import compat


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended: ``status`` (finished), ``sub_status`` (completed/failed/stopped)."""

    run_id: int
    status: str
    sub_status: str
    details: str

    @property
    def ok(self) -> bool:
        return self.status == "finished" and self.sub_status == "completed"


def app_pyproject(run_config: dict) -> bytes:
    """The generated app ``pyproject.toml``: components + the run config under fedsim's keys."""
    def nest(flat: dict) -> dict:
        out: dict = {}
        for key, value in flat.items():
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return out

    doc = {"project": {"name": "fedsimrun", "version": "1.0.0", "description": "fedsim run (generated)",
                       "license": "Apache-2.0", "dependencies": ["flwr>=1.41,<1.42"]},
           "tool": {"flwr": {"app": {"publisher": "fedsim",
                                     "components": {"serverapp": "server.app:app", "clientapp": "clients.app:app"},
                                     "config": nest(run_config)}}}}
    return tomli_w.dumps(doc).encode()


def build_fab(run_config: dict) -> tuple[bytes, str]:
    """The FAB bytes and their sha256 (what the SuperLink identifies the app by)."""
    fab_bytes = compat.build_fab({"pyproject.toml": app_pyproject(run_config)})
    return fab_bytes, hashlib.sha256(fab_bytes).hexdigest()


def submit(client, run_config: dict, simulation: dict | None = None) -> int:
    """Start a run of the code-free FAB; returns the run id.

    ``simulation`` (a simulation SuperLink only): ``num_supernodes`` and client resources.
    """
    fab_bytes, digest = build_fab(run_config)
    return int(client.StartRun(compat.start_run_request(fab_bytes, digest, simulation)).run_id)


def wait(client, run_id: int, timeout_s: float, interval_s: float = 1.0) -> RunOutcome:
    """Poll the run status until it is finished (or ``timeout_s`` passes: status ``timeout``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.ListRuns(compat.list_runs_request(run_id)).run_dict[run_id].status
        if status.status == "finished":
            return RunOutcome(run_id, status.status, status.sub_status, status.details)
        time.sleep(interval_s)
    return RunOutcome(run_id, "timeout", "", f"the run did not finish within {timeout_s:.0f} s")


class LogFollower:
    """Streams a run's ServerApp log from its start, in a background thread, until the run ends.

    One stream must cover the whole run: once a run is finished the SuperLink sends what is
    left, ends the stream and discards the log. ``on_line`` sees each complete line.
    """

    def __init__(self, client, run_id: int, on_line: Callable[[str], None] = lambda line: None):
        self.client, self.run_id, self.on_line = client, run_id, on_line
        self.parts: list[str] = []
        self._pending = ""
        self._thread = threading.Thread(target=self._follow, daemon=True, name="fedsim-log-follower")

    def __enter__(self) -> "LogFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=60)

    def _follow(self) -> None:
        try:
            for res in self.client.StreamLogs(compat.stream_logs_request(self.run_id)):
                self._feed(res.log_output)
        except Exception as exc:  # logs are a courtesy; the run status is what counts
            self.parts.append(f"\n(log stream ended: {exc})\n")

    def _feed(self, text: str) -> None:
        self.parts.append(text)
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self.on_line(line)

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self.parts)
