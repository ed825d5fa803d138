"""The workers engine: real processes over gRPC on 127.0.0.1, parity with in-process, failures, cleanup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.engine import flower_env, run_scenario
from fedsim.federation import get_federation
from fedsim.flower.codec import OUT_DIR_KEY, PROGRESS_KEY, SCENARIO_KEY, scenario_to_config
from fedsim.flower.inprocess import run_server_app
from fedsim.flower.worker import CLIENT_APP_KEY
from fedsim.flower.workers_grid import WorkerGrid
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario
from server.app import app as server_app

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent


def test_parity_with_inprocess(tmp_path, tiny_yaml):
    """Same scenario + seed: bit-identical final models on the in-process and worker engines."""
    run_scenario(parse_scenario(tiny_yaml + "engine: {kind: inprocess}\n"), tmp_path / "a", progress="none")
    run_scenario(parse_scenario(tiny_yaml + "engine: {kind: workers, workers: 2}\n"), tmp_path / "b",
                 progress="none")
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["bytes_up"] for r in ra] == [r["bytes_up"] for r in rb]
    assert json.loads((tmp_path / "b/summary.json").read_text())["engine"] == "workers"


def _run_fixture(tmp_path: Path, text: str, env_extra: dict[str, str]) -> tuple[WorkerGrid, list[dict]]:
    scn = parse_scenario(text)
    run_config = {SCENARIO_KEY: scenario_to_config(scn), OUT_DIR_KEY: str(tmp_path), PROGRESS_KEY: "none",
                  CLIENT_APP_KEY: "apps.fixture_apps:stateful"}
    env = {**flower_env(), "PYTHONPATH": f"{HERE}", **env_extra}
    grid = WorkerGrid(["cpu", "cpu"], get_federation(scn).num_clients, run_config, tmp_path, env, 120)
    with grid:
        run_server_app(server_app, grid, run_config)
    return grid, read_metrics(tmp_path)


def test_client_state_persists_and_workers_stop(tmp_path, tiny_yaml):
    text = tiny_yaml.replace("rounds: 3", "rounds: 4").replace("clients_per_round: 3", "clients_per_round: 6")
    grid, rows = _run_fixture(tmp_path, text, {})
    assert [r["clients"] for r in rows] == [6, 6, 6, 6]
    states = sorted((tmp_path / "client_state").glob("node-*.pb"))
    assert len(states) == 6 and all(p.stat().st_mode & 0o777 == 0o600 for p in states)
    assert all(w.proc.poll() is not None for w in grid.workers), "a worker outlived the run"


def test_dead_worker_reported_round_continues_and_restarts(tmp_path, tiny_yaml):
    text = tiny_yaml.replace("rounds: 3", "rounds: 3").replace("clients_per_round: 3", "clients_per_round: 6")
    grid, rows = _run_fixture(tmp_path, text, {"FIXTURE_DIE_ON_ROUND": "2"})
    assert rows[0]["clients"] == 6
    assert rows[1]["rejected"] == 3 and rows[1]["clients"] == 3            # worker 0 serves clients 0, 2, 4
    assert all("worker 0 (cpu) died" in r for r in rows[1]["rejected_reasons"])
    assert rows[2]["clients"] == 6 - 3 * (grid.workers[0].restarts < 1)    # restarted for round 3 (dies again only on round 2)
    assert grid.workers[0].restarts == 1
    assert all(w.proc.poll() is not None for w in grid.workers)
    # client state survived the crash and the restart: worker 0's clients lost only round 2's update
    from fedsim.flower.grid_base import NODE_ID_BASE
    from fedsim.flower.state_store import load_state
    counts = {c: int(load_state(tmp_path / "client_state", NODE_ID_BASE + c)["fixture"]["count"]) for c in range(6)}
    assert counts == {0: 2, 1: 3, 2: 2, 3: 3, 4: 2, 5: 3}


def test_worker_refuses_callers_without_the_run_token(tmp_path):
    """A worker serves only the server that started it (a per-run token in its environment)."""
    import grpc

    from fedsim.engine.pool import start_worker, stop_workers, wait_ready
    from fedsim.flower.worker import SERVICE, TOKEN_HEADER

    w = start_worker(0, "cpu", tmp_path, flower_env(), "s3cret")
    try:
        wait_ready([w], 120)
        with grpc.insecure_channel(w.address) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Configure")
            for metadata in ((), ((TOKEN_HEADER, "wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    call(b"{}", timeout=30, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stop_workers([w])
    assert w.proc.poll() is not None
