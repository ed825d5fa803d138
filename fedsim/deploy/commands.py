"""The exact shell commands of a multi-machine Flower deployment of one scenario.

:func:`deploy_commands` is pure string building (no flwr import, no file access): it
returns a commented, copy-pasteable script-like text with, in order, the certificate and
node-key generation, the ``$FLWR_HOME/config.toml`` connection of the submitting machine,
the SuperLink command, the ``flwr supernode register`` commands, one SuperNode command per
GPU of every client machine, and the ``fedsim run`` submission.

Layout it assumes (the same relative paths on every machine, or pass absolute ones):
``CERTS/ca.pem`` (+ ``server.pem``/``server.key`` on the server machine only) and
``KEYS/<machine>-node<k>`` (+ ``.pub``) on client machine ``<machine>``.

SuperNode ``k`` of the deployment (counted over all client machines, in ``hosts`` order)
gets ``--node-config 'partition-id=k num-partitions=N …'`` where N is the number of
SuperNodes; the server addresses fedsim's virtual clients by ``client-id`` in each message,
so N need not equal the scenario's ``num_clients``.

Example:
    >>> from fedsim.scenario import parse_scenario
    >>> scn = parse_scenario("name: t\\ndata: {dataset: digits, partition: {kind: iid, num_clients: 4}}\\n"
    ...                      "model: {name: mlp}\\nfederation: {rounds: 1}\\n")
    >>> text = deploy_commands(scn, superlink_host="fl.example.org", hosts={"gpu-box": 2})
    >>> text.count("flower-supernode ")
    2
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
from pathlib import PurePosixPath
from typing import Any, Mapping

from fedsim.runtime import FLOWER_ENV as FLWR_ENV

SUPERNODE_BASE_PORT = 9094
CONNECTION = "fedsim"


def superlink_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 addresses in brackets (``[::1]:9091``)."""
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def export_line() -> str:
    """The ``export`` line with the three Flower switches fedsim sets in every process."""
    return "export " + " ".join(f"{k}={v}" for k, v in FLWR_ENV.items())


def node_key_name(machine: str, k: int) -> str:
    """File name of SuperNode ``k``'s key on client machine ``machine``."""
    return f"{machine}-node{k}"


def deploy_commands(scenario: Any, *, superlink_host: str, port: int = 9091, certs_dir: str = "certs",
                    keys_dir: str = "keys", hosts: Mapping[str, int] | None = None, data_dir: str | None = None,
                    scenario_path: str | None = None, connection: str = CONNECTION) -> str:
    """The commands that deploy ``scenario`` on a SuperLink machine and client machines.

    Args:
        scenario: a validated :class:`fedsim.scenario.Scenario`.
        superlink_host: public DNS name or IP address of the server machine (no port).
        port: the SuperLink port (Fleet + Control + Runtime API); the only port to open.
        certs_dir: directory with ``ca.pem`` (all machines) and ``server.pem``/``server.key``.
        keys_dir: directory with the SuperNode keys on each client machine.
        hosts: client machine name -> number of GPUs; 0 means one CPU SuperNode. Default: one
            machine ``client-1`` with as many GPUs as ``engine.devices`` lists (0 for auto/cpu).
        data_dir: ``data-dir`` node-config value on the client machines (default ``data.root``
            of the scenario; omitted when neither is set).
        scenario_path: the scenario file named in the ``fedsim run`` line.
        connection: name of the SuperLink connection in ``config.toml``.

    Returns:
        The commented command text, ending with a newline.

    Raises:
        ValueError: a bad host name, port, GPU count, data directory or port clash.
    """
    _check_host(superlink_host, "superlink_host")
    if not connection or not all(c.isalnum() or c in "-_" for c in connection):
        raise ValueError(f"connection must be a name of letters, digits, '-' and '_', got {connection!r}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    machines = _machines(scenario, hosts)
    for name in machines:
        _check_host(name, "client machine name")
        if name.strip("[]") == superlink_host.strip("[]") and port in _node_ports(machines[name]):
            raise ValueError(f"SuperNode port {port} on {name} clashes with the SuperLink port; choose another --port")
    data_dir = data_dir if data_dir is not None else getattr(getattr(scenario, "data", None), "root", None)
    if data_dir is not None and any(c in data_dir for c in '"\\\n\r'):
        raise ValueError(f"data_dir must not contain quotes, backslashes or newlines: {data_dir!r}")
    ctx = _Context(scenario, superlink_address(superlink_host, port), superlink_host, port, certs_dir, keys_dir,
                   machines, data_dir, scenario_path or "SCENARIO.yaml", connection)
    sections = [_header(ctx), _certs(ctx), _keys(ctx), _config_toml(ctx), _superlink(ctx), _register(ctx),
                *(_supernodes(ctx, m) for m in machines), _submit(ctx)]
    return "\n\n".join(sections) + "\n"


class _Context:
    """Everything the sections share (kept together so section functions stay short)."""

    def __init__(self, scenario: Any, address: str, host: str, port: int, certs: str, keys: str,
                 machines: dict[str, int], data_dir: str | None, scenario_path: str, connection: str):
        self.scenario, self.address, self.host, self.port = scenario, address, host, int(port)
        self.certs, self.keys, self.machines, self.data_dir = certs, keys, machines, data_dir
        self.scenario_path, self.connection = scenario_path, connection
        self.base: dict[str, int] = {}          # partition-id of each machine's first SuperNode
        self.total = 0
        for name, gpus in machines.items():
            self.base[name], self.total = self.total, self.total + max(1, gpus)

    def cert(self, name: str) -> str:
        return str(PurePosixPath(self.certs) / name)

    def key(self, machine: str, k: int) -> str:
        return str(PurePosixPath(self.keys) / node_key_name(machine, k))

    def ca_abs(self) -> str:
        return os.path.abspath(os.path.expanduser(self.cert("ca.pem")))


def _machines(scenario: Any, hosts: Mapping[str, int] | None) -> dict[str, int]:
    if hosts is None:
        devices = getattr(getattr(scenario, "engine", None), "devices", "auto")
        gpus = len({d for d in devices if d.startswith("cuda")}) if isinstance(devices, list) else 0
        return {"client-1": gpus}
    if not hosts:
        raise ValueError("give at least one client machine")
    out: dict[str, int] = {}
    for name, gpus in hosts.items():
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"client machine {name!r}: the number of GPUs must be an integer >= 0, got {gpus!r}")
        out[name] = gpus
    return out


def _node_ports(gpus: int) -> list[int]:
    return [SUPERNODE_BASE_PORT + k for k in range(max(1, gpus))]


def _check_host(name: str, what: str) -> None:
    bare = name.strip("[]") if isinstance(name, str) else ""
    is_ip = True
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        is_ip = False
    if not bare or (not is_ip and not all(c.isalnum() or c in "-._" for c in bare)):
        raise ValueError(f"{what} must be a DNS name or IP address without a port, got {name!r}")


def _q(path: str) -> str:
    return shlex.quote(str(path))


def _header(c: _Context) -> str:
    scn = c.scenario
    clients = getattr(getattr(getattr(scn, "data", None), "partition", None), "num_clients", None)
    machines = ", ".join(f"{m} ({g} GPU{'s' if g != 1 else ''})" if g else f"{m} (CPU)" for m, g in c.machines.items())
    return "\n".join([
        f"# fedsim deployment of scenario '{getattr(scn, 'name', '?')}'",
        f"# SuperLink: {c.address}   client machines: {machines}",
        f"# {c.total} SuperNodes (node-config partition-id 0..{c.total - 1}) serve the scenario's "
        f"{clients if clients is not None else 'natural'} clients.",
        "# Every machine: fedsim installed (pip install -c constraints.txt -e .) and, in every shell:",
        export_line(),
    ])


def _certs(c: _Context) -> str:
    return "\n".join([
        f"## 1. server machine ({c.host}), once: CA + server certificate (SANs: {c.host.strip('[]')}, "
        "127.0.0.1, localhost)",
        f"fedsim deploy certs {_q(c.certs)} --host {_q(c.host)}",
        f"#    copy {c.cert('ca.pem')} (never a .key file) to every client machine and to the submitting machine",
    ])


def _keys(c: _Context) -> str:
    lines = ["## 2. each client machine, once: one key pair per SuperNode; copy the .pub files to the "
             "submitting machine"]
    for machine, gpus in c.machines.items():
        lines.append(f"# on {machine}:")
        lines += [f"fedsim deploy node-key {_q(c.key(machine, k))}" for k in range(max(1, gpus))]
    return "\n".join(lines)


def _config_toml(c: _Context) -> str:
    return "\n".join([
        "## 3. submitting machine: $FLWR_HOME/config.toml (default ~/.flwr/config.toml) needs this connection;",
        "#    root-certificates must be the absolute path of ca.pem there. A file that already has a",
        "#    [superlink] table keeps that one table (set its default) and gains only [superlink." + c.connection + "].",
        "[superlink]",
        f"default = {json.dumps(c.connection)}",
        f"[superlink.{c.connection}]",
        f"address = {json.dumps(c.address)}",
        f"root-certificates = {json.dumps(c.ca_abs())}",
    ])


def _superlink(c: _Context) -> str:
    cmd = (f"flower-superlink --ssl-ca-certfile {_q(c.cert('ca.pem'))} --ssl-certfile {_q(c.cert('server.pem'))} "
           f"--ssl-keyfile {_q(c.cert('server.key'))} --enable-supernode-auth --host 0.0.0.0 --port {c.port} "
           "--database state.db --disable-runtime-dependency-installation")
    return "\n".join([f"## 4. server machine ({c.host}): the SuperLink (keep it running; only port {c.port} "
                      "must be reachable)", cmd])


def _register(c: _Context) -> str:
    lines = ["## 5. submitting machine, once, with the SuperLink running: register every SuperNode public key"]
    for machine, gpus in c.machines.items():
        for k in range(max(1, gpus)):
            name = node_key_name(machine, k)
            lines.append(f"flwr supernode register {_q(c.key(machine, k) + '.pub')} {c.connection} --name {name}")
    return "\n".join(lines)


def _supernodes(c: _Context, machine: str) -> str:
    gpus = c.machines[machine]
    base = c.base[machine]
    what = f"one SuperNode per GPU ({gpus})" if gpus else "one CPU SuperNode"
    lines = [f"## 6. client machine {machine}: {what}; each in its own terminal (or a systemd unit)", export_line()]
    for k in range(max(1, gpus)):
        config = f"partition-id={base + k} num-partitions={c.total}"
        if c.data_dir is not None:
            config += f' data-dir="{c.data_dir}"'
        prefix = f"CUDA_VISIBLE_DEVICES={k} " if gpus else ""
        lines.append(f"{prefix}flower-supernode --root-certificates {_q(c.cert('ca.pem'))} --superlink {c.address} "
                     f"--auth-supernode-private-key {_q(c.key(machine, k))} --port {SUPERNODE_BASE_PORT + k} "
                     f"--node-config {shlex.quote(config)}")
    return "\n".join(lines)


def _submit(c: _Context) -> str:
    return "\n".join([
        "## 7. submitting machine: check the SuperNodes are online, then run",
        f"flwr supernode list {c.connection}",
        f"fedsim run {_q(c.scenario_path)} --set engine.kind=flower --set engine.superlink={c.address} "
        f"--set engine.root_certificates={_q(c.ca_abs())} --set engine.supernodes={c.total}",
    ])
