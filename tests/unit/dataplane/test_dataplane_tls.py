"""TLS termination in the data plane (rustls): server TLS, mTLS and principals from SANs."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dataplanekit import WAIT, Mesh, call_tool, results

from sidemesh.v1 import tool_pb2_grpc


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject_cn: str | None,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    ca: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject_cn)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = (
            x509.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key = _key()
        self.ca = _cert("test-ca", self.ca_key, None, self.ca_key, [], ca=True)
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        (directory / "ca.pem").write_bytes(self.ca_pem)
        key = _key()
        cert = _cert(
            "server",
            key,
            self.ca,
            self.ca_key,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "server.key").write_bytes(_pem_key(key))

    def client(self, cn: str | None, sans: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = _key()
        cert = _cert(cn, key, self.ca, self.ca_key, sans, client=True)
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def tls(self, *, mtls: bool, required: bool = True) -> object:
        import sidemesh_dataplane as dp

        return dp.TlsConfig(
            str(self.dir / "server.pem"),
            str(self.dir / "server.key"),
            client_ca=str(self.dir / "ca.pem") if mtls else None,
            require_client_cert=required,
        )


@pytest.fixture
def pki(mesh: Mesh) -> Pki:
    return Pki(mesh.dir)


async def _principal(mesh: Mesh, address: str, pki: Pki, client: tuple[bytes, bytes] | None) -> str:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=client[1] if client else None,
        certificate_chain=client[0] if client else None,
    )
    async with grpc.aio.secure_channel(address, creds) as channel:
        await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"), timeout=WAIT)
    return str(mesh.decider.calls[-1].principal)


async def test_tls_without_client_certificates_is_anonymous(mesh: Mesh, pki: Pki) -> None:
    address = mesh.plane.listen("127.0.0.1:0", listener_id="tls", tls=pki.tls(mtls=False))
    assert await _principal(mesh, address, pki, None) == "anonymous"
    async with grpc.aio.insecure_channel(address) as channel:  # plaintext on a TLS port
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_principals_come_from_the_client_certificate(mesh: Mesh, pki: Pki) -> None:
    address = mesh.plane.listen("127.0.0.1:0", listener_id="mtls", tls=pki.tls(mtls=True))
    spiffe = pki.client(
        "agent",
        [
            x509.UniformResourceIdentifier("spiffe://example.org/ns/x"),
            x509.DNSName("agent.example.org"),
        ],
    )
    dns = pki.client("agent", [x509.DNSName("agent.example.org")])
    cn = pki.client("agent-7", [])
    assert await _principal(mesh, address, pki, spiffe) == "spiffe://example.org/ns/x"
    assert await _principal(mesh, address, pki, dns) == "dns:agent.example.org"
    assert await _principal(mesh, address, pki, cn) == "cn:agent-7"
    assert mesh.decider.calls[-1].listener == "mtls"


async def test_mtls_refuses_clients_without_a_certificate_unless_optional(
    mesh: Mesh, pki: Pki
) -> None:
    required = mesh.plane.listen("127.0.0.1:0", listener_id="required", tls=pki.tls(mtls=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _principal(mesh, required, pki, None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mesh.decider.calls == []
    optional = mesh.plane.listen(
        "127.0.0.1:0", listener_id="optional", tls=pki.tls(mtls=True, required=False)
    )
    assert await _principal(mesh, optional, pki, None) == "anonymous"
    other_ca = Pki(mesh.dir / "other") if (mesh.dir / "other").mkdir() is None else None
    assert other_ca is not None
    stranger = other_ca.client("stranger", [x509.DNSName("stranger")])
    with pytest.raises(grpc.aio.AioRpcError):
        await _principal(mesh, required, pki, stranger)


async def test_bad_tls_files_are_an_os_error(mesh: Mesh) -> None:
    import sidemesh_dataplane as dp

    with pytest.raises(OSError, match="cannot read"):
        mesh.plane.listen(
            "127.0.0.1:0", listener_id="bad", tls=dp.TlsConfig("/nonexistent.pem", "/x.key")
        )
