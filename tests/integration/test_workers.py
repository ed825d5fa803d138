"""The workers engine: real processes over gRPC on 127.0.0.1, parity with in-process, failures, cleanup."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.engine import run_scenario
from fedsim.engine.inprocess import run_server_app
from fedsim.engine.workers import WorkerGrid
from fedsim.federation import get_federation
from fedsim.flower.codec import make_run_config
from fedsim.results import read_metrics
from fedsim.runtime import flower_env
from fedsim.scenario import parse_scenario
from server.app import app as server_app

pytestmark = pytest.mark.integration


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
    # The zygote took the data set this process had loaded rather than loading it again (a config
    # hash that differs between the two processes would silently make every run load it twice).
    assert "data set taken from the server's file" in (tmp_path / "b/logs/zygote.log").read_text()


class KillingGrid(WorkerGrid):
    """Kills worker 0 (SIGKILL, by PID) just before it is sent its messages of round ``kill_round``."""

    kill_round = 2

    def _serve(self, i, msgs, deadline):
        if i == 0 and int(msgs[0].content["config"]["server-round"]) == self.kill_round and \
                not self.workers[0].restarts:
            os.kill(self.workers[0].pid, signal.SIGKILL)
            assert self.workers[0].wait(30)
        return super()._serve(i, msgs, deadline)


def _run_grid(tmp_path: Path, text: str, grid_cls=WorkerGrid) -> tuple[WorkerGrid, list[dict]]:
    scn = parse_scenario(text)
    run_config = make_run_config(scn, tmp_path, "none")
    grid = grid_cls(["cpu", "cpu"], get_federation(scn).num_clients, run_config, tmp_path, flower_env(), 120)
    with grid:
        run_server_app(server_app, grid, run_config)
    return grid, read_metrics(tmp_path)


def test_dead_worker_reported_round_continues_and_restarts(tmp_path, tiny_yaml):
    """Without retries the round aggregates the replies it has; the dead worker's clients are
    rejected with the reason and the worker is restarted for the next round."""
    text = tiny_yaml.replace("clients_per_round: 3", "clients_per_round: 6").replace(
        "rounds: 3", "rounds: 3\n  retries: 0")
    grid, rows = _run_grid(tmp_path, text, KillingGrid)
    assert rows[0]["clients"] == 6
    assert rows[1]["rejected"] == 3 and rows[1]["clients"] == 3            # worker 0 serves clients 0, 2, 4
    assert all("worker 0 (cpu) died" in r for r in rows[1]["rejected_reasons"])
    assert rows[1]["rejected_by_reason"] == {"client_error": 3}            # counted per kind in metrics.jsonl
    assert rows[2]["clients"] == 6 and grid.workers[0].restarts == 1      # restarted for round 3
    assert not any(w.alive() for w in grid.workers), "a worker outlived the run"
    assert rows[1]["events"] == ["worker 0 (cpu) died (exit code -9) during the round; it is restarted before it "
                                 "serves again"]
    assert len(rows[2]["events"]) == 1 and rows[2]["events"][0].startswith("worker 0 (cpu) had died (exit code -9): "
                                                                           "restarted in ")
    assert "events" not in rows[0]


def test_dead_worker_clients_are_sent_the_round_again(tmp_path, tiny_yaml):
    """``federation.retries`` (default 1): the clients of a worker that died mid-round are sent the
    round again, to the restarted worker, so the round loses no client and the run equals the
    fault-free one bit for bit. Catches a retry that is never made, one made before the worker is
    restarted, and one whose lost error replies still count as rejections."""
    text = tiny_yaml.replace("clients_per_round: 3", "clients_per_round: 6")
    grid, rows = _run_grid(tmp_path / "killed", text, KillingGrid)
    assert [r["clients"] for r in rows] == [6, 6, 6] and not any(r["rejected"] for r in rows)
    assert grid.workers[0].restarts == 1
    assert rows[1]["events"][-1] == ("3 client(s) [0, 2, 4] lost (worker 0 (cpu) died (exit code -9) while serving "
                                     "client 0): sent the round again (retry 1 of 1)")
    _run_grid(tmp_path / "clean", text)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("killed", "clean"))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"max parameter difference, killed worker + retry vs fault-free: {diff}")
    assert diff == 0.0


class KillBetweenRounds(WorkerGrid):
    """Kills worker 0 (by PID) after round 1, before round 2's messages are dispatched."""

    def _deliver(self, msgs, timeout):
        if int(msgs[0].content["config"]["server-round"]) == 2 and not self.workers[0].restarts:
            os.kill(self.workers[0].pid, signal.SIGKILL)
            assert self.workers[0].wait(30)
        return super()._deliver(msgs, timeout)


def test_worker_dead_between_rounds_is_restarted_and_said(tmp_path, tiny_yaml):
    """A worker that died between rounds is restarted before it serves (no client lost) and the
    round says so in metrics.jsonl (``events``) and on the console. Catches the silent restart that
    made one round 20x slower with ``rejected: 0`` and nothing to explain it."""
    text = tiny_yaml.replace("clients_per_round: 3", "clients_per_round: 6")
    grid, rows = _run_grid(tmp_path, text, KillBetweenRounds)
    assert [r["clients"] for r in rows] == [6, 6, 6] and not any(r["rejected"] for r in rows)
    assert grid.workers[0].restarts == 1
    assert [("events" in r) for r in rows] == [False, True, False]
    assert "worker 0 (cpu) had died (exit code -9): restarted in " in rows[1]["events"][0]


def test_worker_refuses_callers_without_the_run_token(tmp_path):
    """A worker serves only the server that started it (a per-run token in its environment)."""
    import grpc

    from fedsim.engine.pool import SERVICE, TOKEN_ENV, TOKEN_HEADER, Zygote, stop_workers, wait_ready

    zygote = Zygote(tmp_path, flower_env()).start()
    w = zygote.fork(0, "cpu", {TOKEN_ENV: "s3cret"})
    try:
        wait_ready([w], 120)
        # a fork copies no lock another thread holds: the zygote has no thread but its main one
        # (catches numeric libraries' thread pools left on, and a zygote that starts threads)
        assert len(os.listdir(f"/proc/{zygote.proc.pid}/task")) == 1
        with grpc.insecure_channel(w.address) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Configure")
            for metadata in ((), ((TOKEN_HEADER, "wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    call(b"{}", timeout=30, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stop_workers([w])
        zygote.close()
    assert not w.alive() and w.returncode == 0          # stopped by SIGTERM, at once
    assert zygote.proc.poll() is not None


def test_no_worker_or_zygote_outlives_a_killed_server(tmp_path, tiny_yaml):
    """SIGKILL the ``fedsim run`` process mid-run (no cleanup code of it runs): its zygote sees its
    stdin close and stops the workers, and every one of them is gone within seconds. Catches a
    zygote that waits for a command forever, and workers that do not watch their parent."""
    import re
    import subprocess
    import sys
    import time

    scenario = tmp_path / "s.yaml"
    scenario.write_text(tiny_yaml.replace("rounds: 3", "rounds: 500") + "engine: {kind: workers, workers: 2}\n")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 3 and time.monotonic() < deadline and proc.poll() is None:   # the zygote and 2 workers
            for log in (out / "logs").glob("*.log") if (out / "logs").is_dir() else ():
                pids |= {int(p) for p in re.findall(r"\(pid (\d+)\)", log.read_text(errors="replace"))}
            time.sleep(0.1)
        assert len(pids) == 3, f"expected the zygote's and 2 workers' pids in the logs, got {pids}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + 15
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if running(p)]
    print(f"\nzygote and workers {sorted(pids)} after the server's SIGKILL: still running {left}")
    assert not left


class BadHandOver(WorkerGrid):
    """Hands the zygote a file that is not a data set."""

    def _hand_over_dataset(self, tmp, dataset):
        (tmp / "dataset.npz").write_bytes(b"not an npz")
        return tmp / "dataset.npz"


def test_a_failed_data_hand_over_is_said_and_the_workers_load_the_data_themselves(tmp_path, tiny_yaml):
    """The zygote cannot read the data set it is handed: round 1's events say so, and the run is
    the same as ever (each worker loads the data itself). Catches a zygote that dies on a bad
    command (every worker start would fail) and an error that is swallowed without a word."""
    grid, rows = _run_grid(tmp_path, tiny_yaml, BadHandOver)
    assert [r["clients"] for r in rows] == [3, 3, 3] and not any(r["rejected"] for r in rows)
    assert any("the workers' zygote reported:" in e for e in rows[0]["events"]), rows[0].get("events")


class KillZygoteAndWorker(WorkerGrid):
    """Kills the zygote, then worker 0 (SIGKILL, by PID), before round 2 is dispatched."""

    def _deliver(self, msgs, timeout):
        if int(msgs[0].content["config"]["server-round"]) == 2 and not self.workers[0].restarts:
            os.kill(self.zygote.proc.pid, signal.SIGKILL)
            assert self.zygote.gone.wait(30)
            os.kill(self.workers[0].pid, signal.SIGKILL)
            assert self.workers[0].wait(30) or self.zygote.gone.is_set()
        return super()._deliver(msgs, timeout)


def test_a_dead_zygote_is_replaced_when_a_worker_must_be_restarted(tmp_path, tiny_yaml):
    """The zygote dies (e.g. killed for memory), then a worker: the restart starts a new zygote
    and the run completes with every client, saying so. Catches a restart that fails for good
    once its zygote is gone."""
    grid, rows = _run_grid(tmp_path, tiny_yaml, KillZygoteAndWorker)
    assert [r["clients"] for r in rows] == [3, 3, 3]
    assert any("zygote had exited" in e for e in rows[1]["events"]), rows[1].get("events")
    assert grid.workers[0].restarts == 1
