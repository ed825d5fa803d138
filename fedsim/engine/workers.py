"""``engine: workers`` (the default) — the server in this process, clients in W gRPC worker processes."""

from __future__ import annotations

from pathlib import Path

from fedsim.engine.devices import plan_workers
from fedsim.federation import get_federation
from fedsim.results import read_json
from fedsim.scenario import Scenario, ScenarioError


def run(scenario: Scenario, out_dir: Path, *, progress: str = "auto", resume: bool = False) -> dict:
    """Run ``scenario`` with persistent client workers; every worker is stopped on exit, error or Ctrl-C."""
    import torch

    from fedsim.engine import flower_env
    from fedsim.flower.codec import make_run_config
    from fedsim.flower.compat import check_version
    from fedsim.flower.inprocess import run_server_app
    from fedsim.flower.workers_grid import WorkerGrid
    from server.app import app as server_app

    check_version()
    torch.set_num_threads(1)
    eng = scenario.engine
    try:
        devices = plan_workers(eng.devices, workers=eng.workers, workers_per_device=eng.workers_per_device)
    except ValueError as exc:
        raise ScenarioError(f"scenario '{scenario.name}'", [f"engine.devices: {exc}"]) from None
    run_config = make_run_config(scenario, out_dir, progress, resume)
    num_nodes = get_federation(scenario).num_clients
    out_dir.mkdir(parents=True, exist_ok=True)
    with WorkerGrid(devices, num_nodes, run_config, out_dir, flower_env(), eng.start_timeout_s) as grid:
        run_server_app(server_app, grid, run_config)
    return read_json(out_dir / "summary.json")
