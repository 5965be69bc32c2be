"""TLS certificates and node keys for a deployed federation, made with ``cryptography``.

Flower's SuperLink takes a CA, a server certificate and its key (TLS), and admits only SuperNodes
whose public key was registered (``--enable-supernode-auth``, EC keys on a NIST curve in OpenSSH
format). Flower ships no tool that makes them (its docs use an openssl script), hence this module.
Private keys are written with mode 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privet.common.errors import DeploymentError

__all__ = [
    "CertPaths",
    "cert_paths",
    "check_certificate",
    "check_key_pair",
    "check_node_key",
    "check_private_files",
    "init_certs",
    "make_node_key",
    "node_public_keys",
]

#: File names inside a certificate folder.
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, NODES = (
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "nodes",
)


@dataclass(frozen=True)
class CertPaths:
    """The files of a certificate folder made by :func:`init_certs`."""

    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    nodes: Path


def cert_paths(folder: Path) -> CertPaths:
    """The absolute paths of a certificate folder; raises when the server's files are missing.

    Absolute because Flower's processes run in other working directories than the caller's.
    """
    folder = Path(folder).resolve()
    paths = CertPaths(
        ca=folder / CA_CERT,
        ca_key=folder / CA_KEY,
        cert=folder / SERVER_CERT,
        key=folder / SERVER_KEY,
        nodes=folder / NODES,
    )
    missing = [p.name for p in (paths.ca, paths.cert, paths.key) if not p.is_file()]
    if missing:
        raise DeploymentError(
            f"certificate folder {str(folder)!r} lacks {', '.join(missing)}",
            fix=f"make it with `privet certs init --out {folder} --host <server name>`",
        )
    return paths


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (no window in which others could read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def init_certs(
    out: Path,
    *,
    hosts: list[str],
    days: int = 365,
    now: dt.datetime | None = None,
    overwrite: bool = False,
) -> CertPaths:
    """Make a CA and a server certificate for ``hosts`` (DNS names or IP addresses) in ``out``.

    Parameters
    ----------
    out
        Folder to write ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` into.
    hosts
        Names clients use to reach the coordinator; each becomes a subject alternative name.
    days
        Validity of both certificates.
    now
        Start of validity (tests make expired certificates with it).
    overwrite
        Replace existing files (otherwise refuse: a new CA locks out every client of the old one).

    """
    if not hosts:
        raise DeploymentError("no --host given", fix="name the coordinator, e.g. --host 127.0.0.1")
    if days < 1:
        raise DeploymentError(f"--days {days} is not positive", fix="e.g. --days 365")
    out = Path(out)
    if (out / CA_CERT).exists() and not overwrite:
        raise DeploymentError(
            f"{out / CA_CERT} exists; a new CA would lock out every client that trusts the old one",
            fix="choose another --out, or pass --overwrite",
        )
    start = now or dt.datetime.now(dt.UTC)
    end = start + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privet federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_private(out / CA_KEY, _pem_key(ca_key))
    _write_private(out / SERVER_KEY, _pem_key(key))
    (out / CA_CERT).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / SERVER_CERT).write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    (out / NODES).mkdir(exist_ok=True)
    return cert_paths(out)


def make_node_key(name: str, *, out: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Make a node key pair: ``out/<name>.key`` (private, OpenSSH, 0600) and ``out/nodes/<name>.pub``.

    The public half goes into the coordinator's ``nodes/`` folder, which ``privet server``
    registers with the SuperLink at start; the private half goes to the site.
    """
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise DeploymentError(
            f"node name {name!r} is not allowed", fix="use letters, digits, '-', '_' and '.'"
        )
    out = Path(out)
    private, public = out / f"{name}.key", out / NODES / f"{name}.pub"
    if (private.exists() or public.exists()) and not overwrite:
        raise DeploymentError(
            f"a key for node {name!r} exists in {out}", fix="choose another name or --overwrite"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.parent.mkdir(parents=True, exist_ok=True)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" privet-node-{name}\n".encode()
    )
    return private, public


def node_public_keys(folder: Path) -> list[Path]:
    """The registered nodes' public keys (``*.pub``) in a certificate folder's ``nodes/``."""
    nodes = Path(folder) / NODES
    return sorted(nodes.glob("*.pub")) if nodes.is_dir() else []


def check_certificate(path: Path, *, now: dt.datetime | None = None) -> x509.Certificate:
    """Load a PEM certificate and refuse one that is expired or not yet valid (one clear line)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise DeploymentError(f"certificate {path} does not exist") from None
    except ValueError as exc:
        raise DeploymentError(f"{path} is not a PEM certificate ({exc})") from None
    t = now or dt.datetime.now(dt.UTC)
    if t > cert.not_valid_after_utc:
        raise DeploymentError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            fix="make new ones with `privet certs init --overwrite`",
        )
    if t < cert.not_valid_before_utc:
        raise DeploymentError(f"certificate {path} is not valid before {cert.not_valid_before_utc}")
    return cert


def check_key_pair(cert_path: Path, key_path: Path) -> None:
    """Refuse a server key that is not the private half of the server certificate (one line)."""
    cert = check_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError:
        raise DeploymentError(f"private key {key_path} does not exist") from None
    except (ValueError, TypeError) as exc:
        raise DeploymentError(f"{key_path} is not an unencrypted PEM private key ({exc})") from None
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, fmt
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, fmt):
        raise DeploymentError(
            f"{key_path} is not the private key of the certificate {cert_path} (they come from "
            "different `privet certs init` runs)",
            fix="use the server.pem and server.key of one certificate folder, or make both again "
            "with `privet certs init --overwrite`",
        )


def check_node_key(path: Path) -> None:
    """Refuse a node public key that cannot be parsed, naming the file (not "not registered")."""
    try:
        serialization.load_ssh_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, UnicodeError) as exc:
        raise DeploymentError(
            f"node key {path} cannot be parsed as an OpenSSH public key ({exc})",
            fix="replace it with the .pub file `privet certs node NAME` wrote",
        ) from None


def check_private_files(paths: list[Path]) -> list[str]:
    """Warnings for private keys others may read; raises for one others may write.

    A key anyone on the machine can overwrite (a world- or group-writable ``ca.key``) lets them
    mint certificates the sites trust: refused. One they can read is a warning (some operators
    share keys within a group on purpose).
    """
    warnings = []
    for path in paths:
        try:
            mode = Path(path).stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o022:
            raise DeploymentError(
                f"private key {path} can be written by other users (mode {mode:o})",
                fix=f"chmod 600 {path}, and check nobody replaced it",
            )
        if mode & 0o044:
            warnings.append(
                f"private key {path} can be read by other users (mode {mode:o}); `chmod 600 {path}`"
            )
    return warnings
