"""Who may call what, as a client sees it: every listener (Unix socket, TCP with a token,
TLS, mTLS) against every kind of credential (none, wrong, an expired JWT, valid but not
allowed, valid), with real orchestrator processes.

A refusal is ``UNAUTHENTICATED`` or ``PERMISSION_DENIED`` whose message says how to
authenticate or which rule to add, with an ``ErrorInfo`` detail; an admitted call's
principal is on its span and its events. Also: another uid on the Unix socket, rate
limits, the zero-config default (the generated owner token, found by the clients and
the CLI), and a sandboxed plugin with network on the TCP listener.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from meshproc import EXAMPLE_PLUGINS, ROOT, TEST_PLUGINS, Mesh, wait_until
from opentelemetry.sdk.trace import TracerProvider

from clients import AsyncMeshClient, SidemeshError, TlsOptions
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
TOOLS_DEMO = str(EXAMPLE_PLUGINS / "tools-demo")
TCP_CALLER = str(TEST_PLUGINS / "tcp-caller")
ISSUER = "https://idp.test"
CI_SPIFFE = "spiffe://mesh.local/client/ci"
SERVER_SPAN = mesh_pb2.SPAN_KIND_SERVER

#: The rules every mesh of this module has: rules[1] admits the ci identities to the demo
#: tools, rules[2] admits the guests to an agent only (valid credentials, not allowed here).
POLICY: dict[str, Any] = {
    "rules": [
        {"principals": ["group:owner"],
         "allow": {"tools": ["*"], "agents": ["*"], "mcp": ["*"], "mesh": ["read", "admin"]}},
        {"principals": ["token:ci", "jwt:alice", CI_SPIFFE], "allow": {"tools": ["tools-demo/*"]}},
        {"principals": ["token:guest", "jwt:bob", "dns:guest.local"],
         "allow": {"agents": ["assistant/*"]}},
    ]
}  # fmt: skip


def sidemesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The ``sidemesh`` CLI, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    """What ``sidemesh certs`` and ``sidemesh token`` made, and a JWT issuer's keys."""

    dir: Path
    ca: Path
    tokens_file: Path
    jwks_file: Path
    tokens: dict[str, str]
    jwts: dict[str, str]

    def cert(self, stem: str) -> tuple[Path, Path]:
        return self.dir / f"{stem}.pem", self.dir / f"{stem}-key.pem"

    def auth(self, **tls: Any) -> dict[str, Any]:
        """An ``auth:`` section with these tokens and JWTs (and ``tls`` when given)."""
        section: dict[str, Any] = {
            "tokens": {"file": str(self.tokens_file)},
            "jwt": {"issuer": ISSUER, "audience": ["sidemesh"], "jwks_file": str(self.jwks_file),
                    "algorithms": ["ES256"], "leeway": 0},
        }  # fmt: skip
        if tls:
            section["tls"] = {
                "cert": str(self.dir / "server.pem"),
                "key": str(self.dir / "server-key.pem"),
                "client_ca": str(self.ca),
                **tls,
            }
        return section


def _run_ok(*args: str) -> str:
    done = sidemesh(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    certs, other = base / "certs", base / "other-ca"
    _run_ok("certs", "ca", "--dir", str(certs))
    _run_ok("certs", "server", "--dns", "localhost", "--ip", "127.0.0.1", "--dir", str(certs))
    out = _run_ok("certs", "client", "--spiffe", CI_SPIFFE, "--dir", str(certs), "--out", "ci")
    assert f"principal: {CI_SPIFFE}" in out
    out = _run_ok("certs", "client", "--dns", "guest.local", "--dir", str(certs), "--out", "guest")
    assert "principal: dns:guest.local" in out
    # The same identity, signed by a CA the mesh does not trust.
    _run_ok("certs", "ca", "--dir", str(other))
    _run_ok("certs", "client", "--spiffe", CI_SPIFFE, "--dir", str(other), "--out", "forged")
    for suffix in (".pem", "-key.pem"):
        (other / f"forged{suffix}").rename(certs / f"forged{suffix}")
    tokens_file = base / "tokens.yaml"
    tokens = {}
    for name in ("ci", "guest"):
        _run_ok("token", name, "--file", str(tokens_file), "--out", str(base / f"{name}.token"))
        tokens[name] = (base / f"{name}.token").read_text().strip()
    assert tokens["ci"] not in tokens_file.read_text()  # only its hash is kept

    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks_file = base / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**public, "kid": "k1", "use": "sig"}]}))
    now = int(time.time())

    def signed(sub: str, exp: int) -> str:
        claims = {"iss": ISSUER, "aud": "sidemesh", "sub": sub, "iat": now - 7200, "exp": exp}
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})

    jwts = {"alice": signed("alice", now + 3600), "expired": signed("alice", now - 3600)}
    return Pki(certs, certs / "ca.pem", tokens_file, jwks_file, tokens, jwts)


@contextlib.contextmanager
def _mesh(tmp_path_factory: pytest.TempPathFactory, **config: Any) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("auth"), plugin_dirs=[TOOLS_DEMO], **config)
    try:
        mesh.start(ready=["tools-demo"])
        yield mesh
        mesh.stop()
        assert mesh.sidecars() == [], f"processes outlived the mesh\n{mesh.log()}"
    finally:
        mesh.cleanup()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mesh]:
    """A mesh on a Unix socket and plain loopback TCP, with tokens and JWTs."""
    with _mesh(tmp_path_factory, auth=pki.auth(), policy=POLICY) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mesh]:
    """TCP with TLS: client certificates identify callers, tokens are accepted too."""
    with _mesh(tmp_path_factory, auth=pki.auth(require_client_cert=False), policy=POLICY) as m:
        yield m


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mesh]:
    """TCP with mTLS only: no connection without a client certificate the CA signed."""
    with _mesh(tmp_path_factory, auth=pki.auth(require_client_cert=True), policy=POLICY) as m:
        yield m


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SIDEMESH_TOKEN", "SIDEMESH_TOKEN_FILE", "SIDEMESH_TLS_CA", "SIDEMESH_TLS_CERT",
                 "SIDEMESH_TLS_KEY", "SIDEMESH_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


# -- calling, and what the mesh recorded -----------------------------------------------


@dataclass
class Outcome:
    """What a caller saw: OK with the result and the trace id, or the error."""

    error: SidemeshError | None = None
    result: Any = None
    trace_id: str = ""

    @property
    def code(self) -> str:
        return self.error.code.name if self.error is not None else "OK"


_TRACER = TracerProvider().get_tracer("test-auth")


async def call_add(
    address: str,
    *,
    token: str | None = None,
    tls: TlsOptions | None = None,
    state_dir: Path | None = None,
    tool: str = "tools-demo/add",
) -> Outcome:
    """Calls ``tool`` (1 + 2) as a client with these credentials; what it saw."""
    with _TRACER.start_as_current_span("client") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
        try:
            async with AsyncMeshClient(
                address, token=token, tls=tls, state_dir=state_dir or "/nonexistent"
            ) as client:
                result = await client.call_tool(tool, {"a": 1, "b": 2}, timeout=15)
        except SidemeshError as exc:
            return Outcome(error=exc, trace_id=trace_id)
    return Outcome(result=result.structured, trace_id=trace_id)


def recorded_events(mesh: Mesh, replay: int = 1000) -> list[mesh_pb2.WatchEventsResponse]:
    """The mesh's recent events, replayed to the owner (over the Unix socket)."""
    got: list[mesh_pb2.WatchEventsResponse] = []
    with grpc.insecure_channel(mesh.address) as channel:
        stream = mesh_pb2_grpc.MeshServiceStub(channel).WatchEvents(
            mesh_pb2.WatchEventsRequest(replay=replay), timeout=1.5
        )
        with contextlib.suppress(grpc.RpcError):  # the deadline ends the live part
            got.extend(stream)
    return got


def call_event(mesh: Mesh, kind: str, **want: Any) -> Any:
    """The recorded ``kind`` event (``call_started``, ``permission_denied``…) matching ``want``."""

    def find() -> Any:
        for event in recorded_events(mesh):
            if event.WhichOneof("event") != kind:
                continue
            payload = getattr(event, kind)
            if all(getattr(payload, k) == v for k, v in want.items()):
                return payload
        return None

    return wait_until(find, 10, f"a {kind} event with {want}", interval=0.2)


def server_span(mesh: Mesh, trace_id: str) -> mesh_pb2.TraceSpan:
    """The orchestrator's server span of the call traced ``trace_id``."""

    def find() -> mesh_pb2.TraceSpan | None:
        with grpc.insecure_channel(mesh.address) as channel:
            stub = mesh_pb2_grpc.MeshServiceStub(channel)
            try:
                spans = stub.GetTrace(mesh_pb2.GetTraceRequest(trace_id=trace_id), timeout=5).spans
            except grpc.RpcError:
                return None
        return next(
            (s for s in spans if s.service == "sidemesh-orchestrator" and s.kind == SERVER_SPAN),
            None,
        )

    return wait_until(find, 10, f"the orchestrator's span of trace {trace_id}", interval=0.2)


def assert_admitted(mesh: Mesh, outcome: Outcome, principal: str) -> None:
    """The call succeeded, and its span and its call event name ``principal``."""
    assert outcome.error is None, f"{outcome.error}"
    assert outcome.result == {"result": 3}
    span = server_span(mesh, outcome.trace_id)
    assert span.attributes["sidemesh.principal"] == principal
    started = call_event(mesh, "call_started", trace_id=outcome.trace_id)
    assert started.principal == principal and started.target == "tools-demo/add"
    ended = call_event(mesh, "call_finished", trace_id=outcome.trace_id)
    assert ended.principal == principal and ended.code == 0


def assert_unauthenticated(outcome: Outcome, reason: str, *says: str) -> None:
    """``UNAUTHENTICATED`` with the ``ErrorInfo`` reason, its message saying ``says``."""
    assert outcome.code == "UNAUTHENTICATED", f"{outcome.error or outcome.result}"
    assert outcome.error is not None
    assert outcome.error.reason == reason, outcome.error
    for text in says:
        assert text in outcome.error.message, outcome.error.message


def assert_denied(mesh: Mesh, outcome: Outcome, principal: str) -> None:
    """``PERMISSION_DENIED`` naming the rule to add to, with its event."""
    assert outcome.code == "PERMISSION_DENIED", f"{outcome.error or outcome.result}"
    assert outcome.error is not None
    assert outcome.error.reason == "PERMISSION_DENIED"
    assert outcome.error.metadata["principal"] == principal
    assert outcome.error.metadata["target"] == "tools-demo/add"
    assert outcome.error.message.startswith(
        f"principal {principal!r} may not call tool 'tools-demo/add': add 'tools-demo/add' "
        "(or 'tools-demo/*') to allow.tools of policy.rules[2]"
    ), outcome.error.message
    assert str(mesh.config_path) in outcome.error.message
    denied = call_event(mesh, "permission_denied", principal=principal)
    assert denied.target == "tools-demo/add" and "policy.rules[2]" in denied.reason


# -- the matrix: listener x credential ---------------------------------------------------


class TestUnixSocket:
    """The Unix socket: the peer's uid, unless a bearer token says otherwise."""

    async def test_no_credential_is_the_peers_uid(self, plain: Mesh) -> None:
        assert_admitted(plain, await call_add(plain.address), f"unix:uid:{os.getuid()}")

    async def test_a_wrong_token_is_refused_even_from_an_admitted_uid(self, plain: Mesh) -> None:
        outcome = await call_add(plain.address, token="smt_" + "x" * 43)
        secrets = plain.config["auth"]["tokens"]["file"]
        assert_unauthenticated(
            outcome,
            "TOKEN_INVALID",
            f"the bearer token is not one this mesh knows (it matches no entry of {secrets}",
        )

    async def test_an_expired_jwt_is_refused(self, plain: Mesh, pki: Pki) -> None:
        outcome = await call_add(plain.address, token=pki.jwts["expired"])
        assert_unauthenticated(
            outcome, "JWT_EXPIRED", "the JWT expired at", f"get a fresh token from {ISSUER}"
        )

    async def test_a_valid_token_not_allowed_is_denied(self, plain: Mesh, pki: Pki) -> None:
        assert_denied(
            plain, await call_add(plain.address, token=pki.tokens["guest"]), "token:guest"
        )

    async def test_a_valid_token_is_its_principal(self, plain: Mesh, pki: Pki) -> None:
        outcome = await call_add(plain.address, token=pki.tokens["ci"])
        assert_admitted(plain, outcome, "token:ci")
