"""The Node.js example proves who it is: no credential, a wrong or expired token, a valid one that
is not allowed, a valid one, a client certificate; against a TLS (or plaintext) server that
decides with the mesh's own Access."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clients import SidemeshError
from orchestrator._access import Access
from orchestrator._auth_config import AuthConfig, PolicyConfig
from orchestrator._certs import create_ca, issue_client, issue_server, peer_identity
from orchestrator._tokens import add_secret
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc, tool_pb2

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "clients" / "node" / "example.mjs"
SPIFFE = "spiffe://mesh.local/client/ci"
ISSUER = "https://idp.example"

pytestmark = pytest.mark.skipif(
    not (ROOT / "clients" / "node" / "node_modules").is_dir() or not shutil.which("node"),
    reason="node and `npm ci` in clients/node (make setup does both)",
)


class Catalog(mesh_pb2_grpc.MeshServiceServicer):
    """ListTools admits the caller as a routed call to tools-demo/add would be, then answers
    with one tool named after the caller's principal (the example prints it)."""

    def __init__(self, access: Access) -> None:
        self.access = access

    async def ListTools(  # type: ignore[override]
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.MeshServiceListToolsResponse:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            principal = self.access.admit(
                peer_identity(context), authorization, "tool", "tools-demo/add", "CallTool"
            )
        except SidemeshError as err:
            await err.abort(context)
        self.access.release(principal)
        tool = tool_pb2.ToolDescriptor(qualified_name=principal.name)
        return mesh_pb2.MeshServiceListToolsResponse(tools=[tool])


class Mesh:
    """The server on its own thread (node runs as a subprocess while the test waits)."""

    def __init__(self, access: Access, credentials: grpc.ServerCredentials | None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(access, credentials), self._loop)
        self.address = f"127.0.0.1:{self.port.result(5)}"

    async def _start(self, access: Access, credentials: grpc.ServerCredentials | None) -> int:
        self.server = grpc.aio.server()
        mesh_pb2_grpc.add_MeshServiceServicer_to_server(Catalog(access), self.server)
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Certificates, a JWT issuer, a secrets file with token:ci, and the mesh's Access."""
    d = tmp_path_factory.mktemp("node")
    create_ca(d / "certs")
    issue_server(d / "certs", dns=["localhost"], ips=["127.0.0.1"])
    issue_client(d / "certs", spiffe=SPIFFE)
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}
    (d / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (d / "ci.token").write_text("smt_node_ci_token\n")
    add_secret(d / "tokens.yaml", "ci", "smt_node_ci_token")
    auth = AuthConfig.model_validate({
        "tokens": {"file": str(d / "tokens.yaml")},
        "jwt": {"issuer": ISSUER, "audience": "sidemesh", "jwks_file": str(d / "jwks.json")},
    })  # fmt: skip
    policy = PolicyConfig.model_validate({"rules": [
        {"principals": ["group:owner", SPIFFE, "jwt:alice"], "allow": {"tools": ["*"]}},
        {"principals": ["token:ci"], "allow": {"tools": ["other/*"]}},
    ]})  # fmt: skip
    access = Access(auth, policy, {}, d / "state", source="sidemesh.yaml")
    meshes = {
        "tls": Mesh(access, server_credentials(d / "certs", mtls=False)),
        "mtls": Mesh(access, server_credentials(d / "certs", mtls=True)),
        "plain": Mesh(access, None),
    }
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "sidemesh", "sub": "alice"}
    yield {
        "dir": d,
        "access": access,
        "meshes": meshes,
        "jwt": jwt.encode({**claims, "exp": now + 600}, key, "ES256", headers={"kid": "k1"}),
        "expired": jwt.encode({**claims, "exp": now - 600}, key, "ES256", headers={"kid": "k1"}),
    }
    for mesh in meshes.values():
        mesh.stop()


def server_credentials(certs: Path, *, mtls: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [((certs / "server-key.pem").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=mtls,
    )


def node(address: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDEMESH_")}
    clean["XDG_STATE_HOME"] = str(home)
    return subprocess.run(
        [str(shutil.which("node")), str(EXAMPLE), address],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_node_client_over_tls_with_each_kind_of_token(
    world: dict[str, Any], tmp_path: Path
) -> None:
    d: Path = world["dir"]
    tls = world["meshes"]["tls"].address
    ca = {"SIDEMESH_TLS_CA": str(d / "certs" / "ca.pem")}
    owner = world["access"].authenticator.token_file
    cases = [
        ({}, "error: UNAUTHENTICATED: the call has no credential: TLS from a loopback address"),
        ({"SIDEMESH_TOKEN": "smt_wrong"},
         "error: UNAUTHENTICATED: the bearer token is not one this mesh knows"),
        ({"SIDEMESH_TOKEN": world["expired"]}, "error: UNAUTHENTICATED: the JWT expired at"),
        ({"SIDEMESH_TOKEN_FILE": str(d / "ci.token")},
         "error: PERMISSION_DENIED: principal 'token:ci' may not call tool 'tools-demo/add': "
         "add 'tools-demo/add' (or 'tools-demo/*') to allow.tools of policy.rules[1]"),
        ({"SIDEMESH_TOKEN": world["jwt"]}, "tools: jwt:alice"),
        ({"SIDEMESH_TOKEN_FILE": str(owner)}, "tools: token:owner"),
    ]  # fmt: skip
    for env, expected in cases:
        out = node(tls, {**ca, **env}, tmp_path)
        assert expected in out.stdout + out.stderr, (env, out.stdout, out.stderr)


def test_the_node_client_with_a_client_certificate(world: dict[str, Any], tmp_path: Path) -> None:
    certs: Path = world["dir"] / "certs"
    mtls = world["meshes"]["mtls"].address
    env = {"SIDEMESH_TLS_CA": str(certs / "ca.pem"),
           "SIDEMESH_TLS_CERT": str(certs / "client-ci.pem"),
           "SIDEMESH_TLS_KEY": str(certs / "client-ci-key.pem")}  # fmt: skip
    out = node(mtls, env, tmp_path)
    assert out.stdout.splitlines()[0] == f"tools: {SPIFFE}", out.stderr
    no_cert = node(mtls, {"SIDEMESH_TLS_CA": str(certs / "ca.pem")}, tmp_path)
    assert "error: UNAVAILABLE" in no_cert.stderr


def test_the_node_client_finds_the_owner_token_of_the_mesh_on_this_machine(
    world: dict[str, Any], tmp_path: Path
) -> None:
    plain = world["meshes"]["plain"]
    assert "UNAUTHENTICATED" in node(plain.address, {}, tmp_path).stderr
    state = tmp_path / "sidemesh"
    state.mkdir()
    (state / "endpoints.json").write_text(
        json.dumps({"pid": os.getpid(), "addresses": ["unix:/tmp/m.sock", plain.address]})
    )
    shutil.copy(world["access"].authenticator.token_file, state / "token")
    out = node(plain.address, {}, tmp_path)
    assert out.stdout.splitlines()[0] == "tools: token:owner", out.stderr
    refused = node("10.1.2.3:50051", {"SIDEMESH_TOKEN": "smt_x"}, tmp_path)
    assert "refusing to send a token in clear to 10.1.2.3:50051" in refused.stderr
