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

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from authkit import CI_SPIFFE, ISSUER, Pki, call_event, make_pki, server_span, sidemesh
from meshproc import EXAMPLE_PLUGINS, ROOT, TEST_PLUGINS, Mesh, wait_until
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from unprivileged import NOBODY, as_user, user_python

from clients import AsyncMeshClient, SidemeshError, TlsOptions

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
TOOLS_DEMO = str(EXAMPLE_PLUGINS / "tools-demo")
TCP_CALLER = str(TEST_PLUGINS / "tcp-caller")

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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def _mesh(tmp_path_factory: pytest.TempPathFactory, **config: Any) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("auth"), **{"plugin_dirs": [TOOLS_DEMO], **config})
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


class _MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC metrics receiver (the collector service of opentelemetry-proto)."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def gauge(self, name: str) -> dict[tuple[str, str], float]:
        """The latest value of gauge ``name`` per (principal, outcome)."""
        latest: dict[tuple[str, str], float] = {}
        for request in list(self.requests):
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in (m for m in sm.metrics if m.name == name):
                        for point in metric.gauge.data_points:
                            attrs = {a.key: a.value.string_value for a in point.attributes}
                            key = (attrs["sidemesh.principal"], attrs["sidemesh.outcome"])
                            latest[key] = point.as_int or point.as_double
        return latest


@pytest.fixture
def otlp() -> Iterator[tuple[_MetricsReceiver, int]]:
    servicer = _MetricsReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


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


class TestPlainTcp:
    """Loopback TCP without TLS: a bearer token, or nothing."""

    async def test_no_credential_is_told_how_to_authenticate(self, plain: Mesh) -> None:
        outcome = await call_add(plain.tcp_address)
        assert_unauthenticated(
            outcome,
            "CREDENTIAL_MISSING",
            "the call has no credential: plain TCP from a loopback address needs one: pass a "
            "bearer token",
            "--token-file FILE or $SIDEMESH_TOKEN_FILE",
            f"the mesh owner's token is in {plain.state_dir / 'token'}",
        )
        assert outcome.error is not None and outcome.error.metadata["listener"] == "tcp"

    async def test_a_wrong_token_is_refused(self, plain: Mesh) -> None:
        outcome = await call_add(plain.tcp_address, token="smt_" + "y" * 43)
        assert_unauthenticated(outcome, "TOKEN_INVALID", "the bearer token is not one this mesh")

    async def test_an_expired_jwt_is_refused(self, plain: Mesh, pki: Pki) -> None:
        outcome = await call_add(plain.tcp_address, token=pki.jwts["expired"])
        assert_unauthenticated(outcome, "JWT_EXPIRED", "the JWT expired at")

    async def test_a_valid_token_not_allowed_is_denied(self, plain: Mesh, pki: Pki) -> None:
        outcome = await call_add(plain.tcp_address, token=pki.tokens["guest"])
        assert_denied(plain, outcome, "token:guest")

    async def test_a_valid_token_is_its_principal(self, plain: Mesh, pki: Pki) -> None:
        outcome = await call_add(plain.tcp_address, token=pki.tokens["ci"])
        assert_admitted(plain, outcome, "token:ci")

    async def test_a_valid_jwt_is_its_subject(self, plain: Mesh, pki: Pki) -> None:
        outcome = await call_add(plain.tcp_address, token=pki.jwts["alice"])
        assert_admitted(plain, outcome, "jwt:alice")

    async def test_a_token_file_and_the_environment_work_as_well(
        self, plain: Mesh, pki: Pki, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SIDEMESH_TOKEN_FILE", str(pki.tokens_file.parent / "ci.token"))
        assert_admitted(plain, await call_add(plain.tcp_address), "token:ci")


def _tls(pki: Pki, stem: str | None = None) -> TlsOptions:
    if stem is None:
        return TlsOptions(ca=pki.ca)
    cert, key = pki.cert(stem)
    return TlsOptions(ca=pki.ca, cert=cert, key=key)


class TestTls:
    """TLS with a client CA: a client certificate names the caller; tokens work too."""

    async def test_no_credential_is_told_of_tokens_and_certificates(
        self, tls: Mesh, pki: Pki
    ) -> None:
        outcome = await call_add(tls.tcp_address, tls=_tls(pki))
        assert_unauthenticated(
            outcome,
            "CREDENTIAL_MISSING",
            "pass a bearer token",
            f"or a client certificate signed by {pki.ca} (--tls-cert and --tls-key",
        )

    async def test_a_wrong_token_is_refused(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, token="smt_" + "z" * 43, tls=_tls(pki))
        assert_unauthenticated(outcome, "TOKEN_INVALID", "the bearer token is not one this mesh")

    async def test_an_expired_jwt_is_refused(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, token=pki.jwts["expired"], tls=_tls(pki))
        assert_unauthenticated(outcome, "JWT_EXPIRED", "the JWT expired at")

    async def test_a_certificate_not_allowed_is_denied(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, tls=_tls(pki, "guest"))
        assert_denied(tls, outcome, "dns:guest.local")

    async def test_a_certificate_is_its_spiffe_id(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, tls=_tls(pki, "ci"))
        assert_admitted(tls, outcome, CI_SPIFFE)

    async def test_a_token_over_tls_is_its_principal(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, token=pki.tokens["ci"], tls=_tls(pki))
        assert_admitted(tls, outcome, "token:ci")

    async def test_a_certificate_from_another_ca_is_refused(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, tls=_tls(pki, "forged"))
        assert_handshake_refused(outcome)

    async def test_a_client_that_does_not_trust_the_mesh_is_told(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, tls=TlsOptions(ca=pki.other_ca))
        assert_handshake_refused(outcome)

    async def test_plaintext_to_the_tls_listener_gets_no_answer(self, tls: Mesh, pki: Pki) -> None:
        outcome = await call_add(tls.tcp_address, token=pki.tokens["ci"])
        assert outcome.code == "UNAVAILABLE", outcome.error


def assert_handshake_refused(outcome: Outcome) -> None:
    """No connection (grpc says little more than that), and the client says why it may be."""
    assert outcome.code == "UNAVAILABLE", outcome.error
    assert outcome.error is not None
    assert "the TLS handshake with the mesh failed" in outcome.error.message, outcome.error
    assert "--tls-cert and --tls-key" in outcome.error.message


class TestMutualTls:
    """``require_client_cert``: no connection without a certificate the CA signed."""

    async def test_no_certificate_is_refused_at_the_handshake(self, mtls: Mesh, pki: Pki) -> None:
        outcome = await call_add(mtls.tcp_address, tls=_tls(pki))
        assert_handshake_refused(outcome)

    async def test_a_token_without_a_certificate_is_refused(self, mtls: Mesh, pki: Pki) -> None:
        outcome = await call_add(mtls.tcp_address, token=pki.tokens["ci"], tls=_tls(pki))
        assert_handshake_refused(outcome)

    async def test_a_certificate_from_another_ca_is_refused(self, mtls: Mesh, pki: Pki) -> None:
        outcome = await call_add(mtls.tcp_address, tls=_tls(pki, "forged"))
        assert_handshake_refused(outcome)

    async def test_an_expired_jwt_is_refused_with_a_good_certificate(
        self, mtls: Mesh, pki: Pki
    ) -> None:
        outcome = await call_add(mtls.tcp_address, token=pki.jwts["expired"], tls=_tls(pki, "ci"))
        assert_unauthenticated(outcome, "JWT_EXPIRED", "the JWT expired at")

    async def test_a_certificate_not_allowed_is_denied(self, mtls: Mesh, pki: Pki) -> None:
        outcome = await call_add(mtls.tcp_address, tls=_tls(pki, "guest"))
        assert_denied(mtls, outcome, "dns:guest.local")

    async def test_a_certificate_is_its_spiffe_id(self, mtls: Mesh, pki: Pki) -> None:
        outcome = await call_add(mtls.tcp_address, tls=_tls(pki, "ci"))
        assert_admitted(mtls, outcome, CI_SPIFFE)

    async def test_the_cli_with_and_without_a_certificate(self, mtls: Mesh, pki: Pki) -> None:
        cert, key = pki.cert("ci")
        call = ("call", "tools-demo/add", "a=2", "b=3", "-a", mtls.tcp_address, "--tls-ca",
                str(pki.ca))  # fmt: skip
        done = await asyncio.to_thread(
            sidemesh, *call, "--tls-cert", str(cert), "--tls-key", str(key)
        )
        assert done.returncode == 0 and "5" in done.stdout, done.stderr
        done = await asyncio.to_thread(sidemesh, *call)
        assert done.returncode == 1, done.stdout
        assert "sidemesh: UNAVAILABLE: " in done.stderr
        assert "the TLS handshake with the mesh failed" in done.stderr
        assert "this command sent no token, over TLS" in done.stderr


# -- listings and the mesh's own API ---------------------------------------------------


async def test_listings_show_each_principal_what_it_may_call(plain: Mesh, pki: Pki) -> None:
    async def tools(token: str | None) -> list[str]:
        async with AsyncMeshClient(plain.tcp_address, token=token) as client:
            return [t.qualified_name for t in await client.list_tools(timeout=10)]

    assert {"tools-demo/add", "tools-demo/divide"} <= set(await tools(pki.tokens["ci"]))
    assert await tools(pki.tokens["guest"]) == []
    async with AsyncMeshClient(plain.tcp_address, token=pki.tokens["ci"]) as client:
        with pytest.raises(SidemeshError) as info:
            await client.list_plugins(timeout=10)
    assert info.value.code.name == "PERMISSION_DENIED"
    assert "principal 'token:ci' may not" in info.value.message
    assert "allow.mesh" in info.value.message, info.value.message


# -- the Unix socket and other users ---------------------------------------------------

#: A client run as another user: what it saw, as JSON on stdout.
_CLIENT = """
import asyncio, json, sys
from clients import AsyncMeshClient, SidemeshError

async def main():
    try:
        async with AsyncMeshClient(sys.argv[1], state_dir="/nonexistent") as client:
            result = await client.call_tool("tools-demo/add", {"a": 1, "b": 2}, timeout=10)
        print(json.dumps({"code": "OK", "result": result.structured}))
    except SidemeshError as exc:
        print(json.dumps({"code": exc.code.name, "reason": exc.reason, "message": exc.message}))

asyncio.run(main())
"""


def _as_nobody(address: str, workdir: Path) -> dict[str, Any]:
    python = user_python(NOBODY, workdir)
    done = subprocess.run(
        as_user(NOBODY, python, "-c", _CLIENT, address),
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


async def test_another_uid_cannot_use_the_unix_socket(plain: Mesh, tmp_path: Path) -> None:
    assert plain.socket.stat().st_mode & 0o777 == 0o600  # owner-only by default
    seen = _as_nobody(plain.address, tmp_path)
    assert seen["code"] == "UNAVAILABLE", seen  # it cannot even connect
    # Were the file opened up, the mesh would still know the peer by SO_PEERCRED.
    modes = plain.runtime_dir.stat().st_mode, plain.socket.stat().st_mode
    plain.runtime_dir.chmod(0o711)
    plain.socket.chmod(0o666)
    try:
        seen = _as_nobody(plain.address, tmp_path)
    finally:
        plain.runtime_dir.chmod(modes[0] & 0o7777)
        plain.socket.chmod(modes[1] & 0o7777)
    assert seen["code"] == "UNAUTHENTICATED", seen
    assert seen["reason"] == "UID_NOT_ADMITTED"
    assert seen["message"].startswith(
        f"uid {NOBODY} may not use this Unix socket (auth.unix admits uids [{os.getuid()}]): "
        "add it to auth.unix.allowed_uids"
    ), seen["message"]


async def test_an_admitted_uid_is_its_principal(make_mesh: MakeMesh, tmp_path: Path) -> None:
    rules = [*POLICY["rules"], {"principals": [f"unix:uid:{NOBODY}"],
                                "allow": {"tools": ["tools-demo/add"]}}]  # fmt: skip
    mesh = make_mesh(
        plugin_dirs=[TOOLS_DEMO],
        auth={"unix": {"allowed_uids": [os.getuid(), NOBODY]}},
        policy={"rules": rules},
    ).start(ready=["tools-demo"])
    assert mesh.socket.stat().st_mode & 0o777 == 0o666  # others may connect: SO_PEERCRED decides
    mesh.runtime_dir.chmod(0o711)
    seen = _as_nobody(mesh.address, tmp_path)
    assert seen == {"code": "OK", "result": {"result": 3}}, seen
    started = call_event(mesh, "call_started", principal=f"unix:uid:{NOBODY}")
    assert started.target == "tools-demo/add"


# -- limits ----------------------------------------------------------------------------


async def test_rate_and_concurrency_limits_refuse_with_retry_info_and_count(
    otlp: Any, make_mesh: MakeMesh, pki: Pki
) -> None:
    collector, port = otlp
    rules = [
        POLICY["rules"][0],
        {"principals": ["token:ci"], "allow": {"tools": ["tools-demo/*"]},
         "limits": {"calls_per_second": 2, "burst": 2}},
        {"principals": ["token:guest"], "allow": {"tools": ["tools-demo/*"]},
         "limits": {"max_in_flight": 1}},
    ]  # fmt: skip
    mesh = make_mesh(
        plugin_dirs=[TOOLS_DEMO], auth=pki.auth(), policy={"rules": rules},
        telemetry={"otlp_endpoint": f"http://127.0.0.1:{port}", "metrics_interval": 0.5},
    ).start(ready=["tools-demo"])  # fmt: skip
    ci = [await call_add(mesh.tcp_address, token=pki.tokens["ci"]) for _ in range(3)]
    assert [o.code for o in ci] == ["OK", "OK", "RESOURCE_EXHAUSTED"], [o.error for o in ci]
    limited = ci[2].error
    assert limited is not None and limited.reason == "RATE_LIMITED"
    assert limited.retry_delay is not None and 0 < limited.retry_delay <= 0.5
    assert limited.message.startswith(
        "principal 'token:ci' is over its rate limit of 2 calls/s (burst 2, "
        "policy.rules[1].limits); retry in"
    ), limited.message
    await asyncio.sleep(limited.retry_delay + 0.05)
    assert (await call_add(mesh.tcp_address, token=pki.tokens["ci"])).code == "OK"

    async with AsyncMeshClient(mesh.tcp_address, token=pki.tokens["guest"]) as client:
        slow = asyncio.create_task(
            client.call_tool("tools-demo/slow_count", {"n": 10, "delay": 0.2}, timeout=20)
        )
        await asyncio.sleep(0.5)
        busy = await call_add(mesh.tcp_address, token=pki.tokens["guest"])
        await slow
    assert busy.code == "RESOURCE_EXHAUSTED" and busy.error is not None
    assert busy.error.reason == "CONCURRENCY_LIMITED"
    assert busy.error.retry_delay is not None
    assert "already has 1 calls in flight, its limit (policy.rules[2].limits.max_in_flight)" in (
        busy.error.message
    )

    def counted() -> dict[tuple[str, str], float] | None:
        latest = collector.gauge("sidemesh.auth.calls")
        want = {
            ("token:ci", "admitted"): 3,
            ("token:ci", "rate_limited"): 1,
            ("token:guest", "admitted"): 1,
            ("token:guest", "concurrency_limited"): 1,
        }
        return latest if all(latest.get(k) == v for k, v in want.items()) else None

    wait_until(counted, 15, lambda: f"the counts in {collector.gauge('sidemesh.auth.calls')}")


# -- zero config -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh with no auth and no policy section, its state dir where clients look by
    default ($XDG_STATE_HOME/sidemesh); and a plugin granted network and the listeners."""
    xdg = tmp_path_factory.mktemp("xdg")
    with _mesh(
        tmp_path_factory,
        state_dir=str(xdg / "sidemesh"),
        plugin_dirs=[TOOLS_DEMO, TCP_CALLER],
        plugins={"tcp-caller": {"sandbox": {"allow_network": True, "allow_mesh_listeners": True}}},
    ) as mesh:
        mesh.wait_state("tcp-caller", "READY")
        yield mesh


def _xdg(mesh: Mesh) -> dict[str, str]:
    return {"XDG_STATE_HOME": str(mesh.state_dir.parent)}


async def test_with_no_config_tcp_needs_the_generated_token(default: Mesh) -> None:
    token_file = default.state_dir / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().startswith("smt_")
    outcome = await call_add(default.tcp_address)  # from a state dir with no mesh
    assert_unauthenticated(
        outcome, "CREDENTIAL_MISSING", f"the mesh owner's token is in {token_file}"
    )
    done = await asyncio.to_thread(
        sidemesh, "call", "tools-demo/add", "a=1", "b=2", "-a", default.tcp_address,
        env={"XDG_STATE_HOME": str(token_file.parent.parent / "elsewhere")},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("sidemesh: UNAUTHENTICATED: the call has no credential")
    assert "this command sent no token, over plaintext" in done.stderr


async def test_clients_and_the_cli_find_the_token_on_their_own(
    default: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(default.state_dir.parent))
    with _TRACER.start_as_current_span("client") as span:
        async with AsyncMeshClient(default.tcp_address) as client:  # no credential given
            assert client.credentials.describe() == (
                f"a bearer token from the mesh's token file {default.state_dir / 'token'}, "
                "over plaintext"
            )
            result = await client.call_tool("tools-demo/add", {"a": 1, "b": 2}, timeout=15)
    outcome = Outcome(result=result.structured, trace_id=f"{span.get_span_context().trace_id:032x}")
    assert_admitted(default, outcome, "token:owner")

    done = await asyncio.to_thread(
        sidemesh, "call", "tools-demo/add", "a=2", "b=3", "-a", default.tcp_address,
        env=_xdg(default),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "5" in done.stdout
    done = await asyncio.to_thread(sidemesh, "tools", "-a", default.tcp_address, env=_xdg(default))
    assert done.returncode == 0 and "tools-demo/add" in done.stdout, done.stderr
    # `sidemesh events` (found from the state dir: the Unix socket) shows who called.
    line = await asyncio.to_thread(
        _first_line, [sys.executable, "-m", "orchestrator.cli", "events", "--replay", "1000"],
        lambda text: "call_started" in text and "principal=token:owner" in text, _xdg(default),
    )  # fmt: skip
    assert "target=tools-demo/add" in line, line


def _first_line(argv: list[str], wanted: Callable[[str], bool], env: dict[str, str]) -> str:
    """The first line of ``argv``'s output that is ``wanted`` (it is stopped then)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, **env},
    )  # fmt: skip
    timer = threading.Timer(20, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if wanted(line):
                return line
        raise AssertionError(f"{argv} ended without such a line")
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()


async def test_the_unix_socket_is_the_owners_only_by_default(default: Mesh, tmp_path: Path) -> None:
    assert default.socket.stat().st_mode & 0o777 == 0o600
    assert_admitted(default, await call_add(default.address), f"unix:uid:{os.getuid()}")


# -- a sandboxed plugin on the TCP listener ------------------------------------------


async def _from_plugin(mesh: Mesh, tool: str, **arguments: Any) -> dict[str, Any]:
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.call_tool(f"tcp-caller/{tool}", arguments, timeout=30)
    assert not result.is_error, result.text
    assert result.structured is not None
    return dict(result.structured)


async def test_a_plugin_with_network_is_a_stranger_on_the_tcp_listener(default: Mesh) -> None:
    seen = await _from_plugin(default, "call_over_tcp", address=default.tcp_address)
    assert seen["code"] == "UNAUTHENTICATED" and seen["reason"] == "CREDENTIAL_MISSING", seen
    # The owner's token is outside its sandbox...
    token_file = default.state_dir / "token"
    found = await _from_plugin(default, "read_file", path=str(token_file))
    assert found == {"ok": False, "error": "FileNotFoundError"}, found
    # ...a made-up one is no better, and a listing shows it nothing.
    seen = await _from_plugin(default, "call_over_tcp", address=default.tcp_address,
                              token="smt_" + "q" * 43)  # fmt: skip
    assert seen["code"] == "UNAUTHENTICATED" and seen["reason"] == "TOKEN_INVALID", seen
    # Given a credential by the operator, it is that principal, like any client.
    seen = await _from_plugin(default, "call_over_tcp", address=default.tcp_address,
                              token=token_file.read_text().strip())  # fmt: skip
    assert seen == {"code": "OK", "message": "", "reason": ""}, seen
    started = call_event(default, "call_started", principal="token:owner", caller="")
    assert started.target == "tools-demo/add"


# -- changing tokens, and auth off -----------------------------------------------------


async def test_a_replaced_token_stops_working_within_a_second(plain: Mesh, pki: Pki) -> None:
    secrets = str(pki.tokens_file)
    first = sidemesh("token", "temp", "--file", secrets).stdout.strip().splitlines()[-1]
    assert first.startswith("smt_")
    # Valid at once (no restart), and allowed nothing: no rule names it.
    outcome = await call_add(plain.tcp_address, token=first)
    assert outcome.code == "PERMISSION_DENIED", outcome.error
    assert outcome.error is not None and "principal 'token:temp' may not call" in (
        outcome.error.message
    )
    assert sidemesh("token", "temp", "--file", secrets).returncode == 0  # a new one replaces it
    await asyncio.sleep(1.5)
    outcome = await call_add(plain.tcp_address, token=first)
    assert_unauthenticated(outcome, "TOKEN_INVALID", "the bearer token is not one this mesh knows")


async def test_auth_off_lets_anyone_on_tcp_call_as_anonymous(make_mesh: MakeMesh) -> None:
    # `auth: {mode: off}` as YAML 1.1 reads it: a boolean.
    mesh = make_mesh(plugin_dirs=[TOOLS_DEMO], auth={"mode": False}).start(ready=["tools-demo"])
    assert_admitted(mesh, await call_add(mesh.tcp_address), "anonymous")
    # A valid credential still names the caller; a wrong one makes it no one in particular.
    owner = (mesh.state_dir / "token").read_text().strip()
    assert_admitted(mesh, await call_add(mesh.tcp_address, token=owner), "token:owner")
    outcome = await call_add(mesh.tcp_address, token="smt_" + "w" * 43)
    assert_admitted(mesh, outcome, "anonymous")


async def test_an_unauthenticated_call_is_an_event_and_a_log_line(plain: Mesh) -> None:
    outcome = await call_add(plain.tcp_address)
    assert outcome.code == "UNAUTHENTICATED", f"{outcome.error or outcome.result}"
    peer = "plain TCP from a loopback address"
    refused = call_event(plain, "unauthenticated", target="tools-demo/add", peer=peer)
    assert refused.method == "CallTool"
    assert "bearer token" in refused.reason
    wait_until(lambda: "unauthenticated call(s) (the last from" in plain.log(), 10,
               "the orchestrator to log the refusal")  # fmt: skip
