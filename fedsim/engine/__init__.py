"""Engines: where a scenario's server and clients run. Flower is imported only when a run starts.

Example:
    >>> from fedsim.engine import ENGINES
    >>> "inprocess" in ENGINES
    True
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedsim.scenario import Scenario

ENGINES = ("workers", "inprocess", "flower", "ray")

#: Set in every process fedsim starts (and in this one before Flower is imported).
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def flower_env() -> dict[str, str]:
    """The environment for processes fedsim starts: Flower's telemetry, update checks and dependency
    installs off, and this interpreter's ``bin`` first on PATH (Flower starts its helpers by name)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path}


def run_scenario(scenario: Scenario, out_dir: str | Path, *, progress: str = "auto", resume: bool = False) -> dict:
    """Run a validated scenario on its engine; returns ``summary.json``'s content.

    ``resume``: continue the run in ``out_dir`` from its latest checkpoint (same scenario only).
    """
    os.environ.update(FLOWER_ENV)
    if scenario.engine.kind == "inprocess":
        from fedsim.engine.inprocess import run
        return run(scenario, Path(out_dir), progress=progress, resume=resume)
    if scenario.engine.kind == "workers":
        from fedsim.engine.workers import run
        return run(scenario, Path(out_dir), progress=progress, resume=resume)
    if scenario.engine.kind in ("flower", "ray"):
        from fedsim.engine.flower import run
        return run(scenario, Path(out_dir), progress=progress, resume=resume)
    raise ValueError(f"engine '{scenario.engine.kind}' is not available in this version (available: {ENGINES})")
