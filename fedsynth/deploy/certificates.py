"""TLS certificates for the SuperLink and key pairs for Flower's node authentication.

Why a private CA: the federation is a closed group, so the coordinator is its own
certificate authority. Every institution (and whoever runs ``flwr run``) trusts exactly one
file, ``ca.pem``, and verifies the SuperLink's certificate against it; no public CA is
involved and nothing else is trusted. The CA's key signs certificates only and can live
offline once the server certificate is issued.

Files written by :func:`create_server_certificates` in one folder:

- ``ca.pem``: the CA certificate, public; give it to every institution;
- ``ca.key``: the CA's private key (mode 0600); keep it on the coordinator or offline;
- ``server.pem``: the SuperLink's certificate, its SAN listing every host name and IP the
  nodes dial plus ``localhost`` and ``127.0.0.1`` (the SuperLink starts the ServerApp's
  executor itself, which connects back over loopback and verifies the same certificate);
- ``server.key``: its private key (mode 0600).

An existing CA in the folder is reused (never overwritten): re-running with new hosts or
after a year re-issues only the server certificate, and the institutions keep their
``ca.pem``.

Node keys (:func:`create_node_key`): Flower authenticates a SuperNode by an elliptic-curve
key pair in OpenSSH format; the SuperLink (``--enable-supernode-auth``) accepts only nodes
whose public key the coordinator registered (``flwr supernode register``). Each signed
request carries a timestamp signature, so a copied public key is useless without the
private key, which never leaves the institution.

Algorithms: ECDSA P-256 with SHA-256 for the CA and the server (TLS 1.2/1.3 everywhere),
ECDSA P-384 for node keys (the curve Flower's documentation recommends). Private keys are
created with ``os.open(..., 0o600)``, so they are never readable by others, even briefly.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsynth.files import atomic_write

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
#: Always in the server certificate: the SuperLink's own executor dials it over loopback.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
_CLOCK_SKEW = dt.timedelta(minutes=5)
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?{_LABEL}(\.{_LABEL})*$")


class CertificateError(ValueError):
    """A host name, folder or key file is not usable; the message names it."""


@dataclass(frozen=True)
class ServerCertificates:
    """Where the SuperLink's TLS files are (see the module docstring for who keeps which)."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    created_ca: bool  # False: an existing CA in the folder signed the new certificate

    @classmethod
    def in_folder(cls, folder: Path) -> ServerCertificates:
        """The files of ``folder`` as :func:`create_server_certificates` names them; raises
        :class:`CertificateError` naming the first one missing."""
        folder = Path(folder)
        found = cls(
            folder,
            folder / CA_CERT,
            folder / CA_KEY,
            folder / SERVER_CERT,
            folder / SERVER_KEY,
            (),
            False,
        )
        for path in (found.ca_cert, found.server_cert, found.server_key):
            if not path.is_file():
                raise CertificateError(
                    f"{path}: missing (create it with `fedsynth certs create --out {folder}`)"
                )
        return replace(found, hosts=tuple(subject_alt_names(found.server_cert.read_bytes())))


@dataclass(frozen=True)
class NodeKey:
    """An institution's node-authentication key pair (OpenSSH format)."""

    private_key: Path  # stays at the institution: flower-supernode --auth-supernode-private-key
    public_key: Path  # goes to the coordinator: flwr supernode register <public_key>


def normalise_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """``hosts`` plus the loopback names, deduplicated, order kept; each must be an IP
    address or a DNS name (``*.`` wildcards allowed), else :class:`CertificateError`."""
    out: list[str] = []
    for raw in [*hosts, *LOOPBACK_HOSTS]:
        host = raw.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # "[::1]" as written in an address
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS_NAME.match(host):
                raise CertificateError(
                    f"--host {raw!r}: not an IP address or a DNS name (write the name the "
                    "nodes dial, without a port or a scheme)"
                ) from None
        if host not in out:
            out.append(host)
    return tuple(out)


def create_server_certificates(
    folder: Path,
    hosts: Sequence[str] = (),
    *,
    days: int = DEFAULT_DAYS,
    organisation: str = "fedsynth federation",
) -> ServerCertificates:
    """Create (or reuse) the private CA in ``folder`` and issue the SuperLink's certificate
    for ``hosts`` (plus localhost and 127.0.0.1), valid ``days`` days from now.

    The CA is created only when ``ca.pem`` is absent; if ``ca.pem`` exists, ``ca.key`` must
    too, and it signs the new server certificate. ``server.pem`` / ``server.key`` are
    replaced atomically. Returns the paths.
    """
    if days < 1:
        raise CertificateError(f"days must be >= 1, got {days}")
    names = normalise_hosts(hosts)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    created_ca = not ca_cert_path.exists()
    if created_ca:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, organisation, days)
        _write_private_key(ca_key_path, ca_key)
        atomic_write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        if not ca_key_path.exists():
            raise CertificateError(
                f"{ca_cert_path} exists but {ca_key_path} does not: the CA's key is needed "
                "to sign a new server certificate (or remove ca.pem to start a new CA, and "
                "send the new ca.pem to every institution)"
            )
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_cert, ca_key, names, days)
    _write_private_key(folder / SERVER_KEY, server_key)
    atomic_write(folder / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ServerCertificates(
        folder,
        ca_cert_path,
        ca_key_path,
        folder / SERVER_CERT,
        folder / SERVER_KEY,
        names,
        created_ca,
    )


def create_node_key(folder: Path, name: str, *, overwrite: bool = False) -> NodeKey:
    """Write ``<name>.key`` (private, mode 0600) and ``<name>.pub`` (OpenSSH public key)
    in ``folder``: an ECDSA P-384 pair for Flower's node authentication.

    Refuses to replace an existing private key unless ``overwrite``: its public half may
    already be registered at the SuperLink, and a new key would lock the node out until
    the coordinator registers the new one.
    """
    if not _NODE_NAME.match(name):
        raise CertificateError(
            f"node key name {name!r}: use letters, digits, '.', '_' or '-' (max 64)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if private.exists() and not overwrite:
        raise CertificateError(
            f"{private} exists; its public key may already be registered at the SuperLink "
            "(pass overwrite / --force to replace it, then register the new public key)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write(public, line + f" fedsynth-node:{name}\n".encode(), 0o644)
    return NodeKey(private, public)


def subject_alt_names(pem: bytes) -> list[str]:
    """The DNS names and IP addresses a PEM certificate is valid for."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    ]


# ---------------------------------------------------------------------------- internals


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, pem, 0o600)


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise CertificateError(f"{cert_path} / {key_path}: not a PEM CA pair ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path}: expected an EC private key")
    if cert.public_key() != key.public_key():
        raise CertificateError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=days)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, organisation: str, days: int
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA"),
        ]
    )
    start, end = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    days: int,
) -> x509.Certificate:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    start, end = _validity(days)
    end = min(end, ca_cert.not_valid_after_utc)  # never outlive the CA
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
