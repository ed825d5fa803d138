"""``engine: flower`` — Flower's own deployment runtime (SuperLink + SuperNodes); ``engine: ray`` — its
simulation runtime (a ``--simulation`` SuperLink of fedsim's own on a free port; needs ``fedsim[ray]``).

Local mode (``engine: {kind: flower, supernodes: N}``): fedsim starts ``flower-superlink`` and
N ``flower-supernode`` processes on free loopback ports, submits the run through the
Control API, follows it, and stops exactly the processes it started. Remote mode
(``engine.superlink: HOST:PORT``): submit to a running SuperLink (TLS with
``engine.root_certificates``); the ServerApp prints its result files into the run's log and
fedsim unpacks them into the local run directory (``fedsim.results.bundle``).

Flower's deployment runtime starts a process per message and polls every few seconds:
correct for real deployments, slow for simulation (use ``workers`` for that).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from fedsim.errors import ResumeError, RunError
from fedsim.results import bundle
from fedsim.runtime import free_port, start_process, stop_processes
from fedsim.scenario import Scenario, ScenarioError


class FlowerRunError(RunError):
    """The SuperLink reported the run as failed, or it did not finish in time."""


def _exe(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


class LoopbackDeployment:
    """A SuperLink and N SuperNodes on loopback, owned by this object (stopped by PID on exit)."""

    def __init__(self, run_dir: Path, supernodes: int, env: dict[str, str], start_timeout_s: float = 120.0,
                 simulation: bool = False, tls: dict[str, Path] | None = None):
        self.run_dir, self.supernodes, self.start_timeout_s = run_dir, supernodes, start_timeout_s
        self.simulation = simulation
        self.tls = tls   # {"ca_cert", "server_cert", "server_key"} as written by fedsim.deploy.make_certs
        self.home = run_dir / "flwr"
        self.env = {**env, "FLWR_HOME": str(self.home)}
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], log: str) -> None:
        self.procs.append(start_process([_exe(name), *args], env=self.env, log_path=self.run_dir / "logs" / log))

    def __enter__(self) -> "LoopbackDeployment":
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            mode = ["--simulation", "--database", str(self.home / "state.db")] if self.simulation else []
            self._spawn("flower-superlink", [*self._link_security(), "--host", "127.0.0.1", "--port", str(self.port),
                                             "--isolation", "subprocess", *mode], "superlink.log")
            self._wait_health()
            node_security = ["--root-certificates", str(self.tls["ca_cert"])] if self.tls else ["--insecure"]
            for k in range(0 if self.simulation else self.supernodes):
                self._spawn("flower-supernode", [*node_security, "--superlink", self.address, "--port",
                                                 str(free_port()), "--node-config",
                                                 f"partition-id={k} num-partitions={self.supernodes}"],
                            f"supernode-{k}.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _link_security(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.tls["ca_cert"]), "--ssl-certfile", str(self.tls["server_cert"]),
                "--ssl-keyfile", str(self.tls["server_key"])]

    def _wait_health(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=str(self.tls["ca_cert"])) if self.tls else None
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise FlowerRunError(f"flower-superlink exited ({self.procs[0].returncode}); "
                                     f"see {self.run_dir / 'logs' / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise FlowerRunError(f"flower-superlink not healthy within {self.start_timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM the process groups we started (SuperExec and app processes included), then SIGKILL."""
        stop_processes(self.procs, grace_s=10.0, group=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(scenario: Scenario, out_dir: Path, *, progress: str = "auto", resume: bool = False,
        force: bool = False) -> None:
    """Run ``scenario`` on Flower's deployment runtime (``flower``) or simulation runtime (``ray``)."""
    from fedsim.engine import submit
    from fedsim.flower.codec import MIN_NODES_KEY, NODE_WAIT_KEY, SHIP_KEY, make_run_config
    from fedsim.flower.compat import control_client
    from fedsim.runtime import flower_env

    eng, ray = scenario.engine, scenario.engine.kind == "ray"
    if ray:
        _require_ray()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    remote = bool(eng.superlink) and not ray
    nodes = _ray_nodes(scenario) if ray else eng.supernodes
    run_config = make_run_config(scenario, _remote_dir(scenario, resume, progress) if remote else out_dir, "log",
                                 resume, force,
                                 **{MIN_NODES_KEY: nodes, NODE_WAIT_KEY: eng.start_timeout_s,
                                    SHIP_KEY: "true" if remote else "false"})
    with ExitStack() as stack:
        if remote:
            address, certs = eng.superlink, eng.root_certificates
        else:
            local = stack.enter_context(LoopbackDeployment(out_dir, eng.supernodes, flower_env(), eng.start_timeout_s,
                                                        simulation=ray))
            address, certs = local.address, None
        stack.enter_context(_env("FLWR_HOME", str(out_dir / "flwr")))   # Flower's CLI state: this run's, not ~/.flwr
        client = control_client(address, certs)
        sim = {"num_supernodes": nodes, "client_resources_num_cpus": eng.client_cpus,
               "client_resources_num_gpus": eng.client_gpus} if ray else None
        run_id = submit.submit(client, run_config, simulation=sim)
        show = (lambda line: None) if progress == "none" else _round_lines
        with submit.LogFollower(client, run_id, show) as follower:
            outcome = submit.wait(client, run_id, eng.run_timeout_s)
        log_text = follower.text
        (out_dir / "logs").mkdir(exist_ok=True)
        (out_dir / "logs" / "serverapp.log").write_text(log_text)
    if not outcome.ok:
        raise FlowerRunError(f"Flower run {run_id} ended {outcome.status}:{outcome.sub_status} {outcome.details}\n"
                             f"ServerApp log tail:\n{log_text[-2000:]}")
    if remote:
        try:
            bundle.unpack(log_text, out_dir)
        except ValueError as exc:
            raise FlowerRunError(f"run {run_id} finished, but its results could not be read from the log: {exc}")


def _remote_dir(scenario: Scenario, resume: bool, progress: str) -> str:
    """Where the ServerApp on a remote SuperLink machine keeps the run: ``output.dir`` there (so its
    checkpoints stay where ``--resume`` finds them), else a temporary directory ("")."""
    where = scenario.output.dir
    if where and not Path(where).is_absolute():
        raise ScenarioError(f"scenario '{scenario.name}'", [
            f"output.dir: a run on a remote SuperLink ({scenario.engine.superlink}) keeps its files and checkpoints "
            f"in output.dir on that machine, so it must be an absolute path there (got {where!r})"])
    if resume and not where:
        raise ResumeError(f"cannot resume a run on the remote SuperLink {scenario.engine.superlink}: it resumes from "
                          "the checkpoints the SuperLink machine keeps in output.dir, and this scenario sets none; "
                          "set output.dir to an absolute path on that machine (before the run you want to resume)")
    if scenario.output.checkpoint_every and not where and progress != "none":
        print(f"note: output.checkpoint_every is set but output.dir is not: the checkpoints stay in a temporary "
              f"directory on the SuperLink machine ({scenario.engine.superlink}) and the run cannot be resumed; set "
              "output.dir (an absolute path there) to keep them", file=sys.stderr, flush=True)
    return where or ""


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the duration of a block (restored afterwards)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _require_ray() -> None:
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        raise FlowerRunError("engine 'ray' needs Flower's simulation extra: pip install -c constraints.txt -e '.[ray]'")


def _ray_nodes(scenario: Scenario) -> int:
    from fedsim.federation import get_federation
    return get_federation(scenario).num_clients


def _round_lines(line: str) -> None:
    """Echo the ServerApp's progress lines (round k/R, the partition summary) as they arrive."""
    text = line.strip()
    if text.startswith(("round ", "partition ")):
        print(text, file=sys.stderr, flush=True)
