"""Small flwr-free runtime helpers any fedsim module may import: devices, the environment of the
processes fedsim starts, atomic file writes, and stopping processes by PID.

This package is a leaf: it imports nothing else from fedsim.

Example:
    >>> FLOWER_ENV["FLWR_TELEMETRY_ENABLED"]
    '0'
"""

from __future__ import annotations

import os
import sys

from fedsim.runtime.devices import cuda_count, default_device, plan_workers, worker_env
from fedsim.runtime.files import atomic_write_bytes, atomic_write_text
from fedsim.runtime.processes import free_port, start_process, stop_processes

#: Set in every process fedsim starts (and in this one before Flower is imported).
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def flower_env() -> dict[str, str]:
    """The environment for processes fedsim starts: Flower's telemetry, update checks and dependency
    installs off, and this interpreter's ``bin`` first on PATH (Flower starts its helpers by name)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path}


__all__ = ["FLOWER_ENV", "atomic_write_bytes", "atomic_write_text", "cuda_count", "default_device", "flower_env",
           "free_port", "plan_workers", "start_process", "stop_processes", "worker_env"]
