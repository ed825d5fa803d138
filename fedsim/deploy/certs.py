"""TLS certificates for the SuperLink and key pairs for SuperNode authentication.

Everything is generated with the ``cryptography`` package (no ``openssl`` binary needed):

- :func:`make_certs` writes a private CA (``ca.pem``, ``ca.key``) and a server certificate
  (``server.pem``, ``server.key``) signed by it. The server certificate's SubjectAltNames
  always cover ``127.0.0.1`` and ``localhost`` besides the given hosts: Flower 1.41's
  SuperExec dials the SuperLink's Runtime API on loopback over TLS, and fails otherwise.
- :func:`make_node_key` writes one SuperNode key pair: an OpenSSH-format EC private key on
  NIST P-384 and its OpenSSH public key (``NAME.pub``), the format ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` expect.

Private keys are written with mode 0600; existing files are never replaced unless asked.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> sorted(make_certs(d, hosts=["10.0.0.5", "fl.example.org"]))
    ['ca_cert', 'ca_key', 'server_cert', 'server_key']
    >>> [p.name for p in make_node_key(f"{d}/node0")]
    ['node0', 'node0.pub']
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")
CERT_FILES = {"ca_cert": "ca.pem", "ca_key": "ca.key", "server_cert": "server.pem", "server_key": "server.key"}


def make_certs(out_dir: str | os.PathLike, *, hosts: Iterable[str], days: int = 365,
               overwrite: bool = False) -> dict[str, Path]:
    """Write a private CA and a SuperLink server certificate signed by it.

    Args:
        out_dir: directory for ``ca.pem``, ``ca.key``, ``server.pem`` and ``server.key``
            (created if missing).
        hosts: every DNS name or IP address clients use to reach the SuperLink (the public
            name/IP of the server machine). ``127.0.0.1`` and ``localhost`` are always added.
        days: validity of both certificates.
        overwrite: replace existing files instead of refusing.

    Returns:
        Paths keyed ``ca_cert``, ``ca_key``, ``server_cert``, ``server_key``.

    Raises:
        ValueError: an empty host name or ``days < 1``.
        FileExistsError: one of the four files exists and ``overwrite`` is False (nothing is written).
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    names = san_names(hosts)
    out = Path(out_dir)
    paths = {key: out / name for key, name in CERT_FILES.items()}
    if not overwrite:
        _refuse_existing(paths.values())
    out.mkdir(parents=True, exist_ok=True)

    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _write_private(paths["ca_key"], _pem_key(ca_key))
    _write_public(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server_key"], _pem_key(server_key))
    _write_public(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def make_node_key(path_prefix: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair: ``NAME`` (private) and ``NAME.pub``.

    The private key is an unencrypted OpenSSH-format EC key on NIST P-384 (what
    ``ssh-keygen -t ecdsa -b 384 -N ""`` writes), mode 0600; the public key is one
    ``ecdsa-sha2-nistp384 …`` line to pass to ``flwr supernode register``.

    Args:
        path_prefix: path of the private key; the public key gets ``.pub`` appended.
            The parent directory is created if missing.
        overwrite: replace existing files instead of refusing.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        FileExistsError: a file exists and ``overwrite`` is False (nothing is written).
    """
    private = Path(path_prefix)
    if not private.name or private.name in (".", ".."):
        raise ValueError(f"not a key file name: {str(path_prefix)!r}")
    public = private.with_name(private.name + ".pub")
    if not overwrite:
        _refuse_existing([private, public])
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public, line + f" fedsim-{private.name}\n".encode())
    return private, public


def san_names(hosts: Iterable[str]) -> list[str]:
    """The SubjectAltNames of a server certificate: ``hosts`` (deduplicated, in order) + loopback."""
    if isinstance(hosts, str):
        hosts = [hosts]
    names: list[str] = []
    for host in list(hosts) + list(LOOPBACK_NAMES):
        host = host.strip().strip("[]")
        if not host:
            raise ValueError("a host name is empty")
        if any(c.isspace() for c in host) or (":" in host and _ip(host) is None):
            raise ValueError(f"not a DNS name or IP address: {host!r} (give the host without a port)")
        if host not in names:
            names.append(host)
    return names


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _general_name(name: str) -> x509.GeneralName:
    ip = _ip(name)
    return x509.IPAddress(ip) if ip is not None else x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_existing(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only its owner can read (mode 0600, also when replacing a file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)
