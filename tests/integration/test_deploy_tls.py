"""The generated deployment against real Flower processes on 127.0.0.1: TLS and SuperNode auth.

One TLS SuperLink with ``--enable-supernode-auth`` (started from the command text
``fedsim.deploy.deploy_commands`` prints, with ``--host 127.0.0.1`` and a free port) serves:
(a) ``/health`` over HTTPS verified with the generated CA; (b) an ``--insecure`` SuperNode is
refused (Flower exit code 305); (c) a SuperNode with an unregistered key is refused (code 2004),
and after ``flwr supernode register`` the same key connects and is listed online.

Every process is started here and stopped here by PID (SIGTERM, then SIGKILL); the auxiliary
``flower-superexec`` children they spawn are collected by PID and stopped too.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedsim.deploy import deploy_commands, make_certs, make_node_key
from fedsim.scenario import parse_scenario

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

BIN = Path(sys.executable).parent
EXES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
MISSING = [exe for exe in EXES if not (BIN / exe).exists()]
START_S, REFUSE_S, ONLINE_S = 45.0, 40.0, 45.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; empty where /proc is unavailable)."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat_file.parent.name))
    return out


class Procs:
    """The processes this module started; ``stop`` ends exactly those (and their children)."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.started = root, env, []

    def start(self, argv: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=self.root, env=self.env)
        self.started.append(proc)
        return proc, log

    def stop(self, proc: subprocess.Popen) -> None:
        kids = _children(proc.pid) if proc.poll() is None else []
        for pid_group in ([proc.pid], kids):
            self._term(pid_group, proc)

    def _term(self, pids: list[int], proc: subprocess.Popen) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in pids if _alive(p, proc)]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while any(_alive(p, proc) for p in alive) and time.monotonic() < deadline:
                time.sleep(0.1)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def _alive(pid: int, proc: subprocess.Popen) -> bool:
    if pid == proc.pid:
        return proc.poll() is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _argv(line: str, replace: dict[str, str] | None = None) -> list[str]:
    """A generated command line as argv: env assignments dropped, flag values replaced."""
    words = shlex.split(line)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)
    for flag, value in (replace or {}).items():
        words[words.index(flag) + 1] = value
    words[0] = str(BIN / words[0])
    return words


def _line(text: str, start: str) -> str:
    (line,) = [ln for ln in text.splitlines() if not ln.startswith("#") and (ln.startswith(start) or f" {start}" in ln)]
    return line


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if MISSING:
        pytest.skip(f"Flower executables not found next to {sys.executable}: {', '.join(MISSING)}")
    root = tmp_path_factory.mktemp("deploy tls")                      # a space in every path
    (root / "flwrhome").mkdir()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(root / "flwrhome"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # SuperExec is found on PATH
    make_certs(root / "certs", hosts=["127.0.0.1"], days=1)
    port = _free_port()
    scenario = parse_scenario("name: t\ndata: {dataset: digits, partition: {kind: iid, num_clients: 2}}\n"
                              "model: {name: mlp}\nfederation: {rounds: 1}\n")
    text = deploy_commands(scenario, superlink_host="127.0.0.1", port=port, certs_dir=str(root / "certs"),
                           keys_dir=str(root / "keys"), hosts={"box": 1}, data_dir=str(root / "data dir"))
    toml = text[text.index("[superlink]\n"):].split("\n\n", 1)[0]
    (root / "flwrhome" / "config.toml").write_text(toml + "\n")
    make_node_key(root / "keys" / "box-node0")
    procs = Procs(root, env)
    link, log = procs.start(_argv(_line(text, "flower-superlink "), {"--host": "127.0.0.1"}), "superlink")
    try:
        ctx = ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))
        t0, status = time.monotonic(), None
        while time.monotonic() - t0 < START_S and link.poll() is None and status is None:
            try:
                status = urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=3).status
            except OSError:
                time.sleep(0.2)
        if status is None:
            pytest.fail(f"TLS SuperLink not healthy within {START_S:.0f} s (exit {link.poll()}):\n"
                        + log.read_text()[-3000:])
        yield {"root": root, "port": port, "text": text, "procs": procs, "ctx": ctx, "env": env,
               "health_status": status, "health_s": time.monotonic() - t0}
    finally:
        procs.stop_all()


def _run_until_exit(deployment, argv: list[str], name: str) -> tuple[int | None, str, float]:
    procs = deployment["procs"]
    t0 = time.monotonic()
    proc, log = procs.start(argv, name)
    try:
        proc.wait(timeout=REFUSE_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        code = proc.poll()
        procs.stop(proc)
    return code, log.read_text(), time.monotonic() - t0


def _flwr(deployment, *args: str) -> dict:
    proc = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True,
                          env=deployment["env"], cwd=deployment["root"], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _supernode_argv(deployment, **extra: str) -> list[str]:
    argv = _argv(_line(deployment["text"], "flower-supernode "), {"--port": str(_free_port())})
    for flag, value in extra.items():
        argv += [flag, value]
    return argv


def test_health_over_https_with_the_generated_ca(deployment):
    assert deployment["health_status"] == 200
    port = deployment["port"]
    with urllib.request.urlopen(f"https://localhost:{port}/health", context=deployment["ctx"], timeout=5) as r:
        assert r.status == 200                                         # SAN localhost
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):   # a client without the CA is refused
        urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ssl.create_default_context(), timeout=5)


def test_insecure_supernode_is_refused(deployment):
    argv = _supernode_argv(deployment, **{"--max-retries": "1", "--max-wait-time": "10"})
    for flag in ("--root-certificates", "--auth-supernode-private-key"):
        i = argv.index(flag)
        del argv[i:i + 2]
    code, out, wall = _run_until_exit(deployment, argv + ["--insecure"], "supernode-insecure")
    assert code not in (None, 0), f"still running or exit 0 after {wall:.1f} s:\n{out[-3000:]}"
    assert "Exit Code: 305" in out, out[-3000:]


def test_unregistered_key_refused_then_registered_key_online(deployment):
    root = deployment["root"]
    code, out, wall = _run_until_exit(deployment, _supernode_argv(deployment, **{"--max-retries": "1",
                                                                              "--max-wait-time": "10"}),
                                      "supernode-unregistered")
    assert code not in (None, 0), f"still running or exit 0 after {wall:.1f} s:\n{out[-3000:]}"
    assert "Exit Code: 305" in out and "2004" in out, out[-3000:]

    register = _argv(_line(deployment["text"], "flwr supernode register "))
    reply = _flwr(deployment, *register[1:])
    assert reply.get("success") is True, reply
    assert (root / "keys" / "box-node0.pub").exists()

    proc, log = deployment["procs"].start(_supernode_argv(deployment), "supernode-registered")
    t0, nodes = time.monotonic(), []
    while time.monotonic() - t0 < ONLINE_S and proc.poll() is None:
        nodes = _flwr(deployment, "supernode", "list", "fedsim").get("nodes", [])
        if any(n.get("status") == "online" for n in nodes):
            break
        time.sleep(1.0)
    assert proc.poll() is None, f"registered SuperNode exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    assert [n["status"] for n in nodes] == ["online"], nodes
    assert "data dir" in " ".join(_supernode_argv(deployment))       # node-config with a spaced path accepted
    deployment["procs"].stop(proc)
    assert proc.poll() is not None


@pytest.mark.slow
def test_registered_supernode_runs_a_federation_over_tls(deployment, tmp_path):
    """With node authentication on, a registered SuperNode serves a whole fedsim run submitted
    the way `fedsim deploy commands` prints it (engine.superlink + engine.root_certificates)."""
    from fedsim.engine import run_scenario

    root = deployment["root"]
    make_node_key(root / "keys" / "runner-node")
    reply = _flwr(deployment, "supernode", "register", str(root / "keys" / "runner-node.pub"), "fedsim")
    assert reply.get("success") is True, reply
    argv = _supernode_argv(deployment)
    argv[argv.index("--auth-supernode-private-key") + 1] = str(root / "keys" / "runner-node")
    proc, log = deployment["procs"].start(argv, "supernode-runner")
    try:
        scn = parse_scenario(
            "name: tls-auth\ndata: {dataset: digits, partition: {kind: iid, num_clients: 2}}\n"
            "model: {name: mlp, options: {hidden: [8]}}\nfederation: {rounds: 1, local: {steps: 2}}\n"
            f"engine: {{kind: flower, supernodes: 1, superlink: '127.0.0.1:{deployment['port']}', "
            f"root_certificates: '{root / 'certs' / 'ca.pem'}', start_timeout_s: 60}}\n")
        summary = run_scenario(scn, tmp_path / "run", progress="none")
    finally:
        deployment["procs"].stop(proc)
    assert summary["rounds_completed"] == 1 and summary["engine"] == "flower", log.read_text()[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
