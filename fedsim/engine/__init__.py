"""Engines: where a scenario's server and clients run. Flower is imported only when a run starts.

- ``inprocess`` (:mod:`fedsim.engine.inprocess`): one process, a Grid that calls the ClientApp.
- ``workers`` (:mod:`fedsim.engine.workers`, :mod:`fedsim.engine.pool`, :mod:`fedsim.engine.worker`):
  the server here, W client worker processes over gRPC on 127.0.0.1.
- ``flower`` and ``ray`` (:mod:`fedsim.engine.flower`, :mod:`fedsim.engine.submit`): Flower's own
  deployment and simulation runtimes.

Every engine runs the same ServerApp (``server.app``) and ClientApp (``clients.app``).

Example:
    >>> from fedsim.engine import ENGINES
    >>> "inprocess" in ENGINES
    True
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from fedsim.runtime import FLOWER_ENV
from fedsim.scenario import Scenario

ENGINES = ("workers", "inprocess", "flower", "ray")
_MODULES = {"inprocess": "inprocess", "workers": "workers", "flower": "flower", "ray": "flower"}


def run_scenario(scenario: Scenario, out_dir: str | Path, *, progress: str = "auto", resume: bool = False,
                 force: bool = False) -> dict:
    """Run a validated scenario on its engine; returns ``summary.json``'s content.

    Args:
        scenario: a validated scenario.
        out_dir: the run directory.
        progress: ``auto``, ``rich``, ``log`` or ``none``.
        resume: continue the run in ``out_dir`` from its latest intact checkpoint.
        force: resume even when the scenario, partition or fedsim version differ from the checkpoint's.
    """
    from fedsim.results import read_json

    os.environ.update(FLOWER_ENV)
    kind = scenario.engine.kind
    if kind not in _MODULES:
        raise ValueError(f"engine '{kind}' is not available in this version (available: {ENGINES})")
    module = importlib.import_module(f"fedsim.engine.{_MODULES[kind]}")
    module.run(scenario, Path(out_dir), progress=progress, resume=resume, force=force)
    return read_json(Path(out_dir) / "summary.json")
