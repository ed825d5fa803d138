"""Which devices the client workers use: one worker per GPU (or several), else CPU workers.

Example:
    >>> plan_workers("cpu", workers=3, gpus=0)
    ['cpu', 'cpu', 'cpu']
    >>> plan_workers("auto", workers_per_device=2, gpus=2)
    ['cuda:0', 'cuda:0', 'cuda:1', 'cuda:1']
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


#: Device files a GPU driver creates (NVIDIA's, AMD's for ROCm builds of torch); without any of
#: them on Linux there is no GPU, and torch (seconds to import) need not be asked.
_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")


def cuda_count() -> int:
    """Visible CUDA devices (0 without a GPU build of torch or without a GPU)."""
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _DRIVER_PATHS):
        return 0
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_device() -> "torch.device":
    """Where this process computes: ``FEDSIM_DEVICE`` (set for each worker), else the first GPU, else the CPU."""
    import torch
    if os.environ.get("FEDSIM_DEVICE"):
        return torch.device(os.environ["FEDSIM_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_workers(devices: str | Sequence[str] = "auto", *, workers: int | None = None, workers_per_device: int = 1,
                 gpus: int | None = None, cores: int | None = None) -> list[str]:
    """The device of each client worker.

    Args:
        devices: ``auto`` (every visible GPU, else the CPU), ``cpu``, or a list like ``[cuda:0, cuda:1]``.
        workers: CPU workers when no GPU is used (default ``min(2, cores)``).
        workers_per_device: workers sharing each GPU (small models keep a GPU busier this way).
        gpus, cores: for tests; detected when None.
    """
    gpus = cuda_count() if gpus is None else gpus
    if isinstance(devices, str) and devices == "auto":
        devices = [f"cuda:{i}" for i in range(gpus)] or "cpu"
    if isinstance(devices, str) and devices == "cpu":
        n = workers if workers is not None else min(2, cores or os.cpu_count() or 1)
        return ["cpu"] * max(1, n)
    listed = [devices] if isinstance(devices, str) else list(devices)
    for dev in listed:
        if dev.startswith("cuda") and (gpus == 0 or _index(dev) >= gpus):
            raise ValueError(f"engine.devices names {dev}, but {gpus} CUDA device(s) are visible")
    return [dev for dev in listed for _ in range(workers_per_device if dev.startswith("cuda") else 1)]


def _index(dev: str) -> int:
    return int(dev.split(":", 1)[1]) if ":" in dev else 0


def worker_env(device: str) -> dict[str, str]:
    """Environment for a worker on ``device``: a GPU worker sees only its own GPU."""
    if device.startswith("cuda"):
        return {"CUDA_VISIBLE_DEVICES": str(_index(device)), "FEDSIM_DEVICE": "cuda:0"}
    return {"CUDA_VISIBLE_DEVICES": "", "FEDSIM_DEVICE": "cpu"}
