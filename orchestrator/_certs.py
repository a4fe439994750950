"""Development certificates: a local CA, and server and client certificates it signs.

Built with ``cryptography`` (no ``openssl`` shell-outs): EC P-256 keys, SHA-256
signatures, and the extensions TLS stacks check. The CA is ``basicConstraints
CA:true, pathlen:0`` with ``keyCertSign``; leaves are ``CA:false`` with
``digitalSignature`` and ``serverAuth`` or ``clientAuth``, and name who they
are in the subject alternative name: DNS names and IPs for a server, a SPIFFE
URI (``spiffe://trust-domain/path``) or a DNS name for a client. Keys are
written owner-only (0600). For production use certificates from your own PKI
(SPIRE, cert-manager, …); the mesh reads any PEM files.

:func:`certificate_principal` is the rule by which a client certificate names
its caller: the SPIFFE URI SAN, else the first DNS SAN (``dns:NAME``), else the
subject CN (``cn:NAME``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator._principals import TransportIdentity

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
#: Leaves may be backdated this much, for peers whose clocks run a little behind.
_SKEW = datetime.timedelta(minutes=5)
_SPIFFE = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")
_FILE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class CertError(ValueError):
    """A certificate cannot be made as asked; ``str()`` says why and what to do."""


@dataclass(frozen=True)
class Issued:
    """The files of one certificate: the PEM certificate and its private key."""

    cert: Path
    key: Path
    #: The principal the certificate stands for (clients), or its names (servers).
    names: tuple[str, ...] = ()


def create_ca(
    directory: Path,
    *,
    name: str = "Sidemesh development CA",
    days: int = 3650,
    force: bool = False,
) -> Issued:
    """Makes a CA in ``directory`` (``ca.pem``, ``ca-key.pem``); refuses to replace one."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise CertError(
            f"{cert_path} exists already: certificates it signed would stop being trusted if "
            "it were replaced; use --force to replace it anyway, or --dir for another CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sidemesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory, cert_path, key_path, cert, key)
    return Issued(cert_path, key_path, (name,))


def issue_server(
    directory: Path,
    *,
    dns: list[str],
    ips: list[str],
    file_name: str = "server",
    days: int = 365,
) -> Issued:
    """A server certificate for ``dns`` names and ``ips``, signed by the CA in ``directory``."""
    if not dns and not ips:
        raise CertError("name the server: --dns localhost and/or --ip 127.0.0.1")
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(f"{ip!r} is not an IP address, e.g. 127.0.0.1 or ::1") from None
    common_name = dns[0] if dns else ips[0]
    return _issue(directory, file_name, common_name, names, ExtendedKeyUsageOID.SERVER_AUTH,
                  days, (*dns, *ips))  # fmt: skip


def issue_client(
    directory: Path,
    *,
    spiffe: str | None = None,
    dns: list[str] | None = None,
    name: str | None = None,
    file_name: str | None = None,
    days: int = 365,
) -> Issued:
    """A client certificate, signed by the CA in ``directory``, for one principal:
    ``spiffe`` (a URI SAN), else ``dns`` names, else the subject CN ``name``."""
    dns = dns or []
    if spiffe is None and not dns and not name:
        raise CertError(
            "name the client: --spiffe spiffe://mesh.local/client/ci, --dns ci.mesh.local "
            "or --name ci"
        )
    sans: list[x509.GeneralName] = []
    if spiffe is not None:
        if not _SPIFFE.match(spiffe):
            raise CertError(
                f"{spiffe!r} is not a SPIFFE ID: spiffe://TRUST-DOMAIN/PATH, with a lowercase "
                "trust domain and a non-empty path, e.g. spiffe://mesh.local/client/ci"
            )
        sans.append(x509.UniformResourceIdentifier(spiffe))
    sans += [x509.DNSName(d) for d in dns]
    tail = spiffe.rstrip("/").rsplit("/", 1)[-1] if spiffe else None
    common_name = name or tail or dns[0]
    principal = f"{spiffe}" if spiffe else (f"dns:{dns[0]}" if dns else f"cn:{common_name}")
    stem = file_name or f"client-{_FILE_NAME.sub('-', common_name).strip('-') or 'client'}"
    return _issue(directory, stem, common_name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days,
                  (principal,))  # fmt: skip


def certificate_principal(cert: x509.Certificate) -> str:
    """The principal a client certificate names: ``spiffe://…``, else ``dns:…``, else ``cn:…``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                return uri
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            return f"dns:{dns[0]}"
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"cn:{cns[0].value!s}" if cns else ""


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> TransportIdentity:
    """The transport identity of a call to a ``grpc.aio`` TCP server (plain or TLS).

    For Python listeners and tests; the data plane extracts the same itself.
    (grpc-python cannot read a Unix peer's ``SO_PEERCRED``.)
    """
    peer = context.peer() or ""
    host = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]") if ":" in peer else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return TransportIdentity.tcp(loopback=loopback)
    pem = auth.get("x509_pem_cert")
    if not pem:
        return TransportIdentity.tls(loopback=loopback)
    data: Any = next(iter(pem))
    cert = x509.load_pem_x509_certificate(data if isinstance(data, bytes) else str(data).encode())
    return TransportIdentity.tls(certificate_principal(cert), loopback=loopback)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA of ``directory``; ``CertError`` saying how to make one when there is none."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise CertError(f"no CA in {directory}: make one first with: sidemesh certs ca")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path} is not an EC private key")
    return cert, key


def _issue(
    directory: Path,
    stem: str,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
    names: tuple[str, ...],
) -> Issued:
    ca_cert, ca_key = load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    _write(directory, cert_path, key_path, cert, key)
    return Issued(cert_path, key_path, names)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _write(
    directory: Path,
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    for path, data, mode in ((key_path, pem_key, 0o600), (cert_path, pem_cert, 0o644)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
