"""fedsim.deploy: certificates, SuperNode keys, deployment commands and the ``deploy`` CLI."""

from __future__ import annotations

import argparse
import io
import ipaddress
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from rich.console import Console

from fedsim.deploy import deploy_commands, make_certs, make_node_key
from fedsim.deploy.certs import san_names
from fedsim.deploy.cli import add_deploy_parser, parse_client, run_deploy
from fedsim.deploy.commands import FLWR_ENV, superlink_address
from fedsim.scenario import parse_scenario


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ------------------------------------------------------------------------- certs
def test_server_certificate_is_signed_by_the_ca(tmp_path):
    paths = make_certs(tmp_path / "certs", hosts=["fl.example.org", "203.0.113.7"], days=30)
    ca, server = _load_cert(paths["ca_cert"]), _load_cert(paths["server_cert"])
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                           ec.ECDSA(server.signature_hash_algorithm))
    server.verify_directly_issued_by(ca)
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in list(eku)
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 29 < lifetime.days <= 31


def test_sans_cover_hosts_and_loopback(tmp_path):
    paths = make_certs(tmp_path, hosts=["fl.example.org", "203.0.113.7", "2001:db8::1"])
    san = _load_cert(paths["server_cert"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("203.0.113.7"),
                                                            ipaddress.ip_address("2001:db8::1"),
                                                            ipaddress.ip_address("127.0.0.1")}


def test_private_keys_are_owner_only_and_load(tmp_path):
    paths = make_certs(tmp_path, hosts=["localhost"])
    for key in ("ca_key", "server_key"):
        assert _mode(paths[key]) == 0o600
        assert isinstance(serialization.load_pem_private_key(paths[key].read_bytes(), None),
                          ec.EllipticCurvePrivateKey)
    server_key = serialization.load_pem_private_key(paths["server_key"].read_bytes(), None)
    assert server_key.public_key() == _load_cert(paths["server_cert"]).public_key()
    assert _mode(paths["ca_cert"]) == 0o644


def test_existing_files_are_not_overwritten(tmp_path):
    (tmp_path / "server.key").write_text("precious")
    with pytest.raises(FileExistsError, match="server.key"):
        make_certs(tmp_path, hosts=["a.example"])
    assert (tmp_path / "server.key").read_text() == "precious"
    assert not (tmp_path / "ca.pem").exists()           # nothing written on refusal
    (tmp_path / "server.key").chmod(0o644)
    paths = make_certs(tmp_path, hosts=["a.example"], overwrite=True)
    assert paths["server_key"].read_text() != "precious"
    assert _mode(paths["server_key"]) == 0o600           # mode fixed when replacing


@pytest.mark.parametrize("bad", ["", "fl.example.org:9091", "two words"])
def test_bad_host_names_are_refused(bad):
    with pytest.raises(ValueError):
        san_names([bad])


def test_san_names_deduplicate_and_keep_order():
    assert san_names(["b.example", "localhost", "b.example"]) == ["b.example", "localhost", "127.0.0.1"]


# ---------------------------------------------------------------------- node keys
def test_node_key_is_openssh_p384(tmp_path):
    private, public = make_node_key(tmp_path / "keys" / "node0")
    assert (private.name, public.name) == ("node0", "node0.pub")
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    line = public.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert serialization.load_ssh_public_key(line.encode()) == key.public_key()
    assert _mode(private) == 0o600


def test_node_key_refuses_overwrite(tmp_path):
    make_node_key(tmp_path / "n")
    with pytest.raises(FileExistsError, match="n"):
        make_node_key(tmp_path / "n")
    first = (tmp_path / "n.pub").read_text()
    make_node_key(tmp_path / "n", overwrite=True)
    assert (tmp_path / "n.pub").read_text() != first


# ----------------------------------------------------------------------- commands
@pytest.fixture
def scenario(tiny_yaml):
    return parse_scenario(tiny_yaml)


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if start in line and not line.startswith("#")]


def test_commands_superlink_line(scenario):
    text = deploy_commands(scenario, superlink_host="fl.example.org", port=9200, certs_dir="/etc/fedsim/certs",
                           keys_dir="keys", hosts={"gpu-a": 2})
    (link,) = _lines(text, "flower-superlink ")
    argv = shlex.split(link)
    for flag, value in [("--ssl-ca-certfile", "/etc/fedsim/certs/ca.pem"),
                        ("--ssl-certfile", "/etc/fedsim/certs/server.pem"),
                        ("--ssl-keyfile", "/etc/fedsim/certs/server.key"), ("--host", "0.0.0.0"),
                        ("--port", "9200"), ("--database", "state.db")]:
        assert argv[argv.index(flag) + 1] == value
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in text
    for name, value in FLWR_ENV.items():
        assert f"{name}={value}" in text


def test_commands_one_supernode_per_gpu(scenario):
    text = deploy_commands(scenario, superlink_host="10.0.0.5", port=9091, certs_dir="certs", keys_dir="my keys",
                           hosts={"gpu-a": 2, "gpu-b": 3, "cpu-c": 0}, data_dir="/srv/fed data")
    nodes = _lines(text, "flower-supernode ")
    assert len(nodes) == 6
    seen_configs, ports_per_machine = [], {}
    for line in nodes:
        argv = shlex.split(line)
        env = [a for a in argv[:argv.index("flower-supernode")]]
        argv = argv[argv.index("flower-supernode"):]
        assert argv[argv.index("--superlink") + 1] == "10.0.0.5:9091"
        assert argv[argv.index("--root-certificates") + 1] == "certs/ca.pem"
        key = argv[argv.index("--auth-supernode-private-key") + 1]
        machine = Path(key).name.rsplit("-node", 1)[0]
        assert key.startswith("my keys/")
        ports_per_machine.setdefault(machine, []).append(int(argv[argv.index("--port") + 1]))
        seen_configs.append(argv[argv.index("--node-config") + 1])
        gpu = int(Path(key).name.rsplit("-node", 1)[1])
        assert env == ([f"CUDA_VISIBLE_DEVICES={gpu}"] if machine != "cpu-c" else [])
    assert ports_per_machine == {"gpu-a": [9094, 9095], "gpu-b": [9094, 9095, 9096], "cpu-c": [9094]}
    assert seen_configs == [f'partition-id={k} num-partitions=6 data-dir="/srv/fed data"' for k in range(6)]


def test_commands_register_config_and_submit(scenario):
    text = deploy_commands(scenario, superlink_host="fl.example.org", certs_dir="/c", keys_dir="/k",
                           hosts={"box": 2}, scenario_path="scenarios/x.yaml")
    regs = _lines(text, "flwr supernode register ")
    assert regs == ["flwr supernode register /k/box-node0.pub fedsim --name box-node0",
                    "flwr supernode register /k/box-node1.pub fedsim --name box-node1"]
    assert '[superlink.fedsim]\naddress = "fl.example.org:9091"\nroot-certificates = "/c/ca.pem"' in text
    assert "fedsim deploy certs /c --host fl.example.org" in text
    assert "fedsim deploy node-key /k/box-node1" in text
    (run,) = _lines(text, "fedsim run ")
    assert run == ("fedsim run scenarios/x.yaml --set engine.kind=flower --set engine.superlink=fl.example.org:9091 "
                   "--set engine.root_certificates=/c/ca.pem --set engine.supernodes=2")


def test_commands_defaults_and_ipv6(scenario):
    text = deploy_commands(scenario, superlink_host="2001:db8::1", certs_dir="c", keys_dir="k")
    (node,) = _lines(text, "flower-supernode ")
    assert "--superlink [2001:db8::1]:9091" in node and "CUDA_VISIBLE_DEVICES" not in node
    assert "data-dir" not in node
    assert superlink_address("[::1]", 5) == "[::1]:5"


@pytest.mark.parametrize("kwargs, match", [
    ({"superlink_host": "a.example:9091"}, "without a port"),
    ({"superlink_host": "a.example", "port": 0}, "port"),
    ({"superlink_host": "a.example", "hosts": {"x": -1}}, ">= 0"),
    ({"superlink_host": "a.example", "hosts": {}}, "at least one"),
    ({"superlink_host": "a.example", "hosts": {"bad host": 1}}, "client machine"),
    ({"superlink_host": "a.example", "data_dir": 'a"b'}, "quotes"),
    ({"superlink_host": "a.example", "port": 9094, "hosts": {"a.example": 1}}, "clashes"),
])
def test_commands_reject_bad_input(scenario, kwargs, match):
    with pytest.raises(ValueError, match=match):
        deploy_commands(scenario, certs_dir="c", keys_dir="k", **kwargs)


def test_deploy_modules_import_without_flwr():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'flwr': raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import fedsim.deploy, fedsim.deploy.cli\n"
            "assert 'flwr' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------- CLI
def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="fedsim")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    code = run_deploy(args, Console(file=buf, width=200))
    return code, capsys.readouterr().out, buf.getvalue()


def test_cli_certs_and_refusal(tmp_path, capsys):
    code, out, _ = _cli(["deploy", "certs", str(tmp_path / "c"), "--host", "fl.example.org", "--host", "10.1.2.3",
                         "--days", "10"], capsys)
    assert code == 0 and "server.pem" in out
    assert (tmp_path / "c" / "ca.pem").exists()
    code, _, err = _cli(["deploy", "certs", str(tmp_path / "c"), "--host", "fl.example.org"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, _ = _cli(["deploy", "certs", str(tmp_path / "c"), "--host", "x.example", "--overwrite"], capsys)
    assert code == 0
    code, _, err = _cli(["deploy", "certs", str(tmp_path / "d"), "--host", "x.example", "--days", "0"], capsys)
    assert code == 2 and "days" in err


def test_cli_node_key_creates_directory(tmp_path, capsys):
    code, out, err = _cli(["deploy", "node-key", str(tmp_path / "new" / "dir" / "node3")], capsys)
    assert code == 0 and (tmp_path / "new" / "dir" / "node3.pub").exists()
    assert "flwr supernode register" in err
    code, _, err = _cli(["deploy", "node-key", str(tmp_path / "new" / "dir" / "node3")], capsys)
    assert code == 2 and "node3" in err


def test_cli_commands(tmp_path, capsys, tiny_yaml):
    path = tmp_path / "s.yaml"
    path.write_text(tiny_yaml)
    code, out, _ = _cli(["deploy", "commands", str(path), "--superlink-host", "fl.example.org", "--port", "9300",
                         "--client", "a:2", "--client", "b:0", "--data-dir", "/data"], capsys)
    assert code == 0
    assert len(_lines(out, "flower-supernode ")) == 3 and "--port 9300" in out
    assert f"fedsim run {path}" in out


def test_cli_commands_bad_input(tmp_path, capsys, tiny_yaml):
    code, _, err = _cli(["deploy", "commands", str(tmp_path / "missing.yaml"), "--superlink-host", "h"], capsys)
    assert code == 2 and "cannot read" in err
    path = tmp_path / "s.yaml"
    path.write_text(tiny_yaml)
    code, _, err = _cli(["deploy", "commands", str(path), "--superlink-host", "h", "--set", "federation.rounds=0"],
                        capsys)
    assert code == 2 and "federation.rounds" in err
    for spec, match in [("a:x", "HOST:GPUS"), ("a:-1", "HOST:GPUS")]:
        code, _, err = _cli(["deploy", "commands", str(path), "--superlink-host", "h", "--client", spec], capsys)
        assert code == 2 and match in err
    code, _, err = _cli(["deploy", "commands", str(path), "--superlink-host", "h", "--client", "a:1",
                         "--client", "a:2"], capsys)
    assert code == 2 and "twice" in err


def test_parse_client():
    assert parse_client("gpu-box:4") == ("gpu-box", 4)
    assert parse_client("cpu-box") == ("cpu-box", 0)


def test_deploy_is_a_fedsim_subcommand(tmp_path, capsys):
    from fedsim.cli import main
    assert main(["deploy", "certs", str(tmp_path / "c"), "--host", "fl.example.org"]) == 0
    assert (tmp_path / "c" / "ca.pem").is_file() and (tmp_path / "c" / "server.key").stat().st_mode & 0o777 == 0o600
    assert main(["deploy", "certs", str(tmp_path / "c"), "--host", "fl.example.org"]) == 2   # no silent overwrite
