"""Worker planning: one worker per GPU (or several), else min(2, cores) CPU workers."""

from __future__ import annotations

import pytest

from fedsim.runtime.devices import plan_workers, worker_env


def test_cpu_defaults_and_counts():
    assert plan_workers("auto", gpus=0, cores=8) == ["cpu", "cpu"]
    assert plan_workers("auto", gpus=0, cores=1) == ["cpu"]
    assert plan_workers("cpu", workers=3, gpus=4) == ["cpu"] * 3


def test_gpus_and_sharing():
    assert plan_workers("auto", gpus=2) == ["cuda:0", "cuda:1"]
    assert plan_workers(["cuda:1"], workers_per_device=3, gpus=2) == ["cuda:1"] * 3
    with pytest.raises(ValueError, match="1 CUDA device"):
        plan_workers(["cuda:1"], gpus=1)


def test_worker_env_isolates_one_gpu():
    assert worker_env("cuda:3") == {"CUDA_VISIBLE_DEVICES": "3", "FEDSIM_DEVICE": "cuda:0"}
    assert worker_env("cpu")["FEDSIM_DEVICE"] == "cpu"
