"""``engine: inprocess`` — the ServerApp and the ClientApp in one process (the reference runtime)."""

from __future__ import annotations

from pathlib import Path

from fedsim.federation import get_federation
from fedsim.results import read_json
from fedsim.scenario import Scenario


def run(scenario: Scenario, out_dir: Path, *, progress: str = "auto", resume: bool = False) -> dict:
    """Run ``scenario`` with one virtual Flower node per client; returns the summary."""
    import torch

    from clients.app import app as client_app
    from fedsim.flower.codec import make_run_config
    from fedsim.flower.compat import check_version
    from fedsim.flower.inprocess import run_inprocess
    from server.app import app as server_app

    check_version()
    torch.set_num_threads(1)
    run_config = make_run_config(scenario, out_dir, progress, resume)
    num_nodes = get_federation(scenario).num_clients
    run_inprocess(server_app, client_app, num_nodes, run_config, state_dir=out_dir / "client_state")
    return read_json(out_dir / "summary.json")



