"""``fedsim deploy``: certificates, SuperNode keys and the commands of a multi-machine deployment.

Subcommands::

    fedsim deploy certs DIR --host NAME [--host NAME2 ...] [--days N] [--overwrite]
    fedsim deploy node-key DIR/NAME [--overwrite]
    fedsim deploy commands SCENARIO --superlink-host NAME [--port P] [--certs DIR] [--keys DIR]
                                    [--client HOST:GPUS ...] [--data-dir PATH] [--set KEY=VALUE ...]

Exit codes: 0 success, 2 bad input (existing files, bad names, invalid scenario).
Registered in ``fedsim/cli.py`` with :func:`add_deploy_parser` and :func:`run_deploy`.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedsim.deploy.commands import SUPERNODE_BASE_PORT, deploy_commands

EXIT_USAGE = 2


def add_deploy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``deploy`` command (with its ``certs``, ``node-key``, ``commands`` subcommands).

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned; the parsed
            namespace gets ``command="deploy"`` when the parent uses ``dest="command"``.

    Returns:
        The ``deploy`` parser.
    """
    dep = subparsers.add_parser("deploy", help="multi-machine deployment: TLS certificates, SuperNode keys, commands",
                                description="Helpers for running a scenario on a SuperLink and SuperNodes on "
                                            "several machines (see deploy/README.md).")
    sub = dep.add_subparsers(dest="deploy_command", required=True, metavar="{certs,node-key,commands}")
    certs = sub.add_parser("certs", help="write a CA and a SuperLink server certificate (TLS)")
    certs.add_argument("dir", help="output directory for ca.pem, ca.key, server.pem, server.key")
    certs.add_argument("--host", dest="hosts", action="append", required=True, metavar="NAME",
                       help="DNS name or IP clients use to reach the SuperLink (repeatable); "
                            "127.0.0.1 and localhost are always included")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")
    key = sub.add_parser("node-key", help="write a SuperNode authentication key pair (NAME, NAME.pub)")
    key.add_argument("path", metavar="DIR/NAME", help="private key path; the public key is NAME.pub")
    key.add_argument("--overwrite", action="store_true", help="replace existing files")
    cmd = sub.add_parser("commands", help="print the commands that deploy a scenario on several machines")
    cmd.add_argument("scenario", help="path to a scenario YAML file")
    cmd.add_argument("--superlink-host", required=True, metavar="NAME", help="public DNS name or IP of the server")
    cmd.add_argument("--port", type=int, default=9091, help="SuperLink port (default 9091)")
    cmd.add_argument("--certs", default="certs", metavar="DIR", help="certificate directory (default certs)")
    cmd.add_argument("--keys", default="keys", metavar="DIR", help="SuperNode key directory (default keys)")
    cmd.add_argument("--client", dest="clients", action="append", default=[], metavar="HOST:GPUS",
                     help=f"a client machine and its GPU count, 0 = one CPU SuperNode (repeatable); "
                          f"SuperNode k listens on {SUPERNODE_BASE_PORT}+k")
    cmd.add_argument("--data-dir", metavar="PATH", help="data-dir node-config value on the client machines")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a scenario value before generating (repeatable)")
    return dep


def run_deploy(args: argparse.Namespace, console: Any) -> int:
    """Run a parsed ``fedsim deploy …`` command; return the exit code (0 or 2).

    Args:
        args: namespace from a parser built with :func:`add_deploy_parser`.
        console: a ``rich.console.Console`` (or anything with ``print``) for messages.
    """
    handler = {"certs": _certs, "node-key": _node_key, "commands": _commands}[args.deploy_command]
    try:
        return handler(args, console)
    except (FileExistsError, ValueError) as exc:
        _say(console, f"deploy {args.deploy_command}: {exc}")
    except OSError as exc:
        _say(console, f"deploy {args.deploy_command}: {exc.filename or ''}: {exc.strerror or exc}")
    return EXIT_USAGE


def parse_client(spec: str) -> tuple[str, int]:
    """``HOST:GPUS`` (or ``HOST``, meaning 0 GPUs) -> ``(host, gpus)``."""
    host, sep, gpus = spec.rpartition(":")
    if not sep:
        host, gpus = spec, "0"
    if not host or not gpus.isdigit():
        raise ValueError(f"--client expects HOST:GPUS (GPUS an integer >= 0, 0 = CPU), got {spec!r}")
    return host, int(gpus)


def _certs(args: argparse.Namespace, console: Any) -> int:
    from fedsim.deploy.certs import make_certs
    paths = make_certs(args.dir, hosts=args.hosts, days=args.days, overwrite=args.overwrite)
    for path in paths.values():
        print(path)
    _say(console, f"copy {paths['ca_cert']} to every client machine and the submitting machine; "
                   f"{paths['server_key'].name} and {paths['ca_key'].name} stay on this machine")
    return 0


def _node_key(args: argparse.Namespace, console: Any) -> int:
    from fedsim.deploy.certs import make_node_key
    private, public = make_node_key(args.path, overwrite=args.overwrite)
    print(private)
    print(public)
    _say(console, f"register it once: flwr supernode register {public} <connection>")
    return 0


def _commands(args: argparse.Namespace, console: Any) -> int:
    from fedsim.scenario import ScenarioError, load_scenario
    try:
        scenario = load_scenario(args.scenario, args.overrides)
    except ScenarioError as exc:
        _say(console, str(exc))
        return EXIT_USAGE
    hosts: dict[str, int] | None = None
    if args.clients:
        hosts = {}
        for spec in args.clients:
            host, gpus = parse_client(spec)
            if host in hosts:
                raise ValueError(f"client machine {host!r} is given twice")
            hosts[host] = gpus
    print(deploy_commands(scenario, superlink_host=args.superlink_host, port=args.port, certs_dir=args.certs,
                          keys_dir=args.keys, hosts=hosts, data_dir=args.data_dir, scenario_path=args.scenario),
          end="")
    return 0


def _say(console: Any, text: str) -> None:
    console.print(text, highlight=False, markup=False)
