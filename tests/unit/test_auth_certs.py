"""``sidemesh certs``: a CA and the certificates it signs, proven with cryptography and real TLS."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from orchestrator._auth_config import AuthConfig
from orchestrator._authn import AuthenticationError, Authenticator
from orchestrator._certs import (
    CertError,
    certificate_principal,
    create_ca,
    issue_client,
    issue_server,
    peer_identity,
)
from orchestrator._principals import TransportIdentity
from orchestrator.cli import main

SPIFFE = "spiffe://mesh.local/client/ci"


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    create_ca(directory)
    issue_server(directory, dns=["localhost"], ips=["127.0.0.1"])
    issue_client(directory, spiffe=SPIFFE)
    return directory


def test_the_ca_signs_server_and_client_certificates_that_verify(certs: Path) -> None:
    ca, server, client = (
        load(certs / "ca.pem"),
        load(certs / "server.pem"),
        load(certs / "client-ci.pem"),
    )
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    store = Store([ca])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example")).verify(
            server, []
        )
    verified = PolicyBuilder().store(store).build_client_verifier().verify(client, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(SPIFFE)]

    def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for leaf in (server, client):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    for key in ("ca-key.pem", "server-key.pem", "client-ci-key.pem"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600


def test_a_client_certificate_names_its_principal(certs: Path) -> None:
    assert certificate_principal(load(certs / "client-ci.pem")) == SPIFFE
    by_dns = issue_client(certs, dns=["ci.mesh.local"], file_name="dns")
    assert certificate_principal(load(by_dns.cert)) == "dns:ci.mesh.local"
    by_name = issue_client(certs, name="robot")
    assert by_name.cert == certs / "client-robot.pem"
    assert certificate_principal(load(by_name.cert)) == "cn:robot"
    assert by_name.names == ("cn:robot",)


def test_mistakes_are_refused_with_what_to_do(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(CertError, match=r"exists already.*--force"):
        create_ca(certs)
    with pytest.raises(CertError, match="make one first with: sidemesh certs ca"):
        issue_server(tmp_path / "empty", dns=["localhost"], ips=[])
    with pytest.raises(CertError, match="not a SPIFFE ID"):
        issue_client(certs, spiffe="spiffe://Mesh Local/x")
    with pytest.raises(CertError, match="name the client"):
        issue_client(certs)
    with pytest.raises(CertError, match="not an IP address"):
        issue_server(certs, dns=[], ips=["localhost"])


# -- the certificates work for gRPC TLS and mTLS -------------------------------------------


async def serve(certs: Path, *, mtls: bool, authenticator: Authenticator) -> tuple[Any, int]:
    """A grpc.aio TLS server on 127.0.0.1:0 whose one method answers with the caller's principal."""

    async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            principal = authenticator.authenticate(
                peer_identity(context), context.invocation_metadata() or ()
            )
        except AuthenticationError as err:
            await err.abort(context)
        return principal.name.encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(
            "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(who)}
        )]
    )  # fmt: skip
    credentials = grpc.ssl_server_credentials(
        [((certs / "server-key.pem").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=mtls,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


async def ask(port: int, credentials: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        answer: bytes = await channel.unary_unary("/test.Who/Am")(b"", timeout=5)
        return answer.decode()


async def test_mtls_identifies_the_client_by_its_spiffe_id(certs: Path, tmp_path: Path) -> None:
    authenticator = Authenticator(AuthConfig(), tmp_path / "state")
    server, port = await serve(certs, mtls=True, authenticator=authenticator)
    try:
        ca = (certs / "ca.pem").read_bytes()
        client = grpc.ssl_channel_credentials(
            ca, (certs / "client-ci-key.pem").read_bytes(), (certs / "client-ci.pem").read_bytes()
        )
        assert await ask(port, client) == SPIFFE
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # no client certificate
            await ask(port, grpc.ssl_channel_credentials(ca))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        other = tmp_path / "other"
        create_ca(other)
        issue_client(other, spiffe=SPIFFE)  # the same name, from a CA the server does not trust
        forged = grpc.ssl_channel_credentials(
            ca, (other / "client-ci-key.pem").read_bytes(), (other / "client-ci.pem").read_bytes()
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask(port, forged)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_tls_carries_a_bearer_token_and_refuses_a_call_without(
    certs: Path, tmp_path: Path
) -> None:
    authenticator = Authenticator(AuthConfig(), tmp_path / "state")
    assert authenticator.token_file is not None
    token = authenticator.token_file.read_text().strip()
    server, port = await serve(certs, mtls=False, authenticator=authenticator)
    try:
        tls = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
        with_token = grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(token)
        )
        assert await ask(port, with_token) == "token:owner"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask(port, tls)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "TLS from a loopback address (no client certificate) needs one" in (
            caught.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # a server it does not trust
            await ask(port, grpc.ssl_channel_credentials())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# -- the commands ------------------------------------------------------------------------------


def test_the_certs_commands_say_what_they_wrote_and_what_to_do_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "c"
    assert main(["certs", "ca", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {d}/ca-key.pem (mode 0600)" in out
    assert "next: sidemesh certs server --dns localhost --ip 127.0.0.1" in out
    assert (
        main(["certs", "server", "--dir", str(d), "--dns", "localhost", "--ip", "127.0.0.1"]) == 0
    )
    out = capsys.readouterr().out
    assert "for: localhost, 127.0.0.1" in out
    assert f"tls: {{cert: {d}/server.pem, key: {d}/server-key.pem, client_ca: {d}/ca.pem}}" in out
    assert main(["certs", "client", "--dir", str(d), "--spiffe", SPIFFE]) == 0
    out = capsys.readouterr().out
    assert f"principal: {SPIFFE}" in out
    assert (
        f"use: --tls-ca {d}/ca.pem --tls-cert {d}/client-ci.pem --tls-key {d}/client-ci-key.pem"
        in out
    )
    assert main(["certs", "ca", "--dir", str(d)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_the_token_command_prints_the_token_once_and_keeps_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = tmp_path / "tokens.yaml"
    assert main(["token", "ci", "--file", str(secrets)]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[-1]
    assert out[0] == f"added token:ci to {secrets} (the mesh re-reads it within a second)"
    assert token.startswith("smt_")
    assert token not in secrets.read_text()
    authenticator = Authenticator(
        AuthConfig.model_validate({"tokens": {"file": str(secrets)}}), tmp_path / "state"
    )
    identity = TransportIdentity.tcp(loopback=True)
    assert authenticator.authenticate(identity, {"authorization": f"Bearer {token}"}).name == (
        "token:ci"
    )
    assert main(["token", "owner", "--file", str(secrets)]) == 2
