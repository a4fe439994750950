"""The client's credentials: token, token file, TLS and mTLS, the environment, the running mesh's
own token; what the server receives and what the user is told."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import (
    AsyncMeshClient,
    MeshClient,
    TlsOptions,
    UnauthenticatedError,
)
from orchestrator._certs import create_ca, issue_client, issue_server
from orchestrator.cli import main
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

SPIFFE = "spiffe://mesh.local/client/ci"
ENV = ("SIDEMESH_TOKEN", "SIDEMESH_TOKEN_FILE", "SIDEMESH_TLS_CA", "SIDEMESH_TLS_CERT",
       "SIDEMESH_TLS_KEY", "SIDEMESH_ADDRESS")  # fmt: skip


class Recording(mesh_pb2_grpc.MeshServiceServicer):
    """ListPlugins records what the caller sent: its authorization and TLS identity."""

    def __init__(self) -> None:
        self.authorization: list[str | None] = []
        self.peer_uri: list[str | None] = []
        self.refuse: str | None = None

    async def ListPlugins(  # type: ignore[override]
        self, request: mesh_pb2.ListPluginsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.ListPluginsResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.authorization.append(metadata.get("authorization"))
        uri = (context.auth_context() or {}).get("peer_spiffe_id")
        self.peer_uri.append(uri[0].decode() if uri else None)
        if self.refuse is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.refuse)
        return mesh_pb2.ListPluginsResponse()


class Server:
    def __init__(self, port: int, servicer: Recording, server: grpc.aio.Server) -> None:
        self.address = f"127.0.0.1:{port}"
        self.port = port
        self.rec = servicer
        self.server = server


async def start(credentials: grpc.ServerCredentials | None = None) -> Server:
    servicer = Recording()
    server = grpc.aio.server()
    mesh_pb2_grpc.add_MeshServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return Server(port, servicer, server)


class ThreadedServer:
    """A recording server on its own thread and loop, for blocking clients and the CLI."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(start(credentials), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.server.stop(None), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))  # no real mesh's token


@pytest.fixture
async def plain() -> AsyncIterator[Server]:
    server = await start()
    yield server
    await server.server.stop(None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    create_ca(directory)
    issue_server(directory, dns=["localhost"], ips=["127.0.0.1"])
    issue_client(directory, spiffe=SPIFFE)
    return directory


@pytest.fixture
async def tls(certs: Path) -> AsyncIterator[Server]:
    credentials = grpc.ssl_server_credentials(
        [((certs / "server-key.pem").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = await start(credentials)
    yield server
    await server.server.stop(None)


async def sent(address: str, **options: Any) -> str:
    async with AsyncMeshClient(address, tracing=False, **options) as client:
        await client.list_plugins(timeout=5)
        return client.credentials.describe()


# -- tokens over plaintext loopback --------------------------------------------------------


async def test_a_token_travels_as_bearer_metadata(plain: Server, tmp_path: Path) -> None:
    how = await sent(plain.address, token="smt_given")
    assert how == "a bearer token from token=, over plaintext"
    token_file = tmp_path / "token"
    token_file.write_text("smt_from_file\n")
    await sent(plain.address, token_file=token_file)
    assert plain.rec.authorization == ["Bearer smt_given", "Bearer smt_from_file"]


async def test_the_environment_gives_the_token(
    plain: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("smt_env_file")
    monkeypatch.setenv("SIDEMESH_TOKEN_FILE", str(token_file))
    how = await sent(plain.address)
    assert how == f"a bearer token from $SIDEMESH_TOKEN_FILE ({token_file}), over plaintext"
    monkeypatch.setenv("SIDEMESH_TOKEN", "smt_env")  # wins over the file
    await sent(plain.address)
    await sent(plain.address, token="smt_argument")  # and an argument over both
    assert plain.rec.authorization == [
        "Bearer smt_env_file",
        "Bearer smt_env",
        "Bearer smt_argument",
    ]


def running_mesh(state_dir: Path, addresses: list[str], *, pid: int | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "endpoints.json").write_text(
        json.dumps({"pid": os.getpid() if pid is None else pid, "addresses": addresses})
    )
    (state_dir / "token").write_text("smt_owner\n")


async def test_the_token_of_the_mesh_running_from_the_state_dir_is_found(
    plain: Server, tmp_path: Path
) -> None:
    state = tmp_path / "xdg" / "sidemesh"  # the default state dir ($XDG_STATE_HOME)
    running_mesh(state, ["unix:/tmp/x.sock", plain.address])
    how = await sent(plain.address)
    assert how == f"a bearer token from the mesh's token file {state / 'token'}, over plaintext"
    await sent(f"localhost:{plain.port}")  # the same mesh by another loopback name
    other = tmp_path / "other"
    running_mesh(other, [f"0.0.0.0:{plain.port}"])
    await sent(plain.address, state_dir=other)
    assert plain.rec.authorization == ["Bearer smt_owner"] * 3


async def test_no_token_goes_to_a_mesh_that_did_not_write_it(plain: Server, tmp_path: Path) -> None:
    state = tmp_path / "state"
    running_mesh(state, ["127.0.0.1:1"])  # another port: another server
    how = await sent(plain.address, state_dir=state)
    assert how == "no token, over plaintext"
    running_mesh(state, [plain.address], pid=2**22 + 12345)  # a mesh that died
    await sent(plain.address, state_dir=state)
    assert plain.rec.authorization == [None, None]


def test_a_token_is_never_sent_in_clear_to_another_host() -> None:
    with pytest.raises(ValueError, match="refusing to send a bearer token") as caught:
        AsyncMeshClient("10.1.2.3:50051", token="smt_x")
    assert "connect with TLS (tls=TlsOptions(ca=...), --tls-ca or $SIDEMESH_TLS_CA)" in str(
        caught.value
    )
    assert AsyncMeshClient("unix:/tmp/m.sock", token="smt_x").credentials.token == "smt_x"


def test_a_missing_token_file_is_named() -> None:
    with pytest.raises(ValueError, match="cannot read the token file of token_file /nope"):
        AsyncMeshClient("127.0.0.1:1", token_file="/nope")


async def test_the_callers_own_authorization_metadata_wins(plain: Server) -> None:
    async with AsyncMeshClient(
        plain.address, token="smt_ours", metadata=[("authorization", "Bearer smt_theirs")]
    ) as client:
        await client.list_plugins(timeout=5)
    assert plain.rec.authorization == ["Bearer smt_theirs"]


# -- TLS and mTLS -------------------------------------------------------------------------


async def test_mtls_with_a_client_certificate_and_a_token(tls: Server, certs: Path) -> None:
    options = TlsOptions(certs / "ca.pem", certs / "client-ci.pem", certs / "client-ci-key.pem")
    how = await sent(tls.address, tls=options, token="smt_over_tls")
    assert how == "a bearer token from token=, over TLS with a client certificate"
    assert tls.rec.authorization == ["Bearer smt_over_tls"]  # grpc's call credentials
    assert tls.rec.peer_uri == [SPIFFE]


async def test_tls_from_the_environment(
    tls: Server, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEMESH_TLS_CA", str(certs / "ca.pem"))
    monkeypatch.setenv("SIDEMESH_TLS_CERT", str(certs / "client-ci.pem"))
    monkeypatch.setenv("SIDEMESH_TLS_KEY", str(certs / "client-ci-key.pem"))
    how = await sent(tls.address)
    assert how == "no token, over TLS with a client certificate"
    assert tls.rec.peer_uri == [SPIFFE]
    monkeypatch.delenv("SIDEMESH_TLS_KEY")
    with pytest.raises(ValueError, match="needs its key"):
        AsyncMeshClient(tls.address)


def test_the_blocking_client_takes_the_same_options(certs: Path) -> None:
    threaded = ThreadedServer(grpc.ssl_server_credentials(
        [((certs / "server-key.pem").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    ))  # fmt: skip
    try:
        tls = threaded.server
        options = TlsOptions(certs / "ca.pem", certs / "client-ci.pem", certs / "client-ci-key.pem")
        with MeshClient(tls.address, tls=options, token="smt_sync", tracing=False) as client:
            assert client.list_plugins(timeout=5) == []
            assert client.credentials.describe().endswith("over TLS with a client certificate")
        assert tls.rec.authorization == ["Bearer smt_sync"]
        assert tls.rec.peer_uri == [SPIFFE]
    finally:
        threaded.stop()


# -- UNAUTHENTICATED: the user is told how ------------------------------------------------


async def test_a_terse_unauthenticated_says_how_to_authenticate(plain: Server) -> None:
    plain.rec.refuse = "missing credentials"
    with pytest.raises(UnauthenticatedError) as caught:
        await sent(plain.address)
    assert caught.value.message.startswith(
        "missing credentials; authenticate with a bearer token (clients: token= or token_file=; "
        "the sidemesh CLI: --token-file or $SIDEMESH_TOKEN_FILE / $SIDEMESH_TOKEN;"
    )
    plain.rec.refuse = "no credential: pass --token-file or set SIDEMESH_TOKEN"
    with pytest.raises(UnauthenticatedError) as caught:
        await sent(plain.address)
    assert caught.value.message == "no credential: pass --token-file or set SIDEMESH_TOKEN"


# -- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def threaded() -> Iterator[Server]:
    running = ThreadedServer()
    yield running.server
    running.stop()


def test_the_cli_sends_its_token_file_and_says_what_it_sent_when_refused(
    threaded: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = threaded
    token_file = tmp_path / "ci.token"
    token_file.write_text("smt_cli\n")
    assert main(["plugins", "-a", server.address, "--token-file", str(token_file)]) == 0
    assert server.rec.authorization == ["Bearer smt_cli"]
    server.rec.refuse = "the call has no credential: pass --token-file (SIDEMESH_TOKEN)"
    assert main(["plugins", "-a", server.address]) == 1
    err = capsys.readouterr().err
    assert "sidemesh: UNAUTHENTICATED: the call has no credential" in err
    assert "this command sent no token, over plaintext" in err
    with pytest.raises(SystemExit) as exited:
        main(["plugins", "-a", "10.9.8.7:1", "--token", "smt_x"])
    assert exited.value.code == 2
    assert "refusing to send a bearer token (token=) in clear" in capsys.readouterr().err
