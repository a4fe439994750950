"""What the auth tests share: credentials made as an operator makes them (``sidemesh certs``,
``sidemesh token``, a JWT issuer's keys), and what the mesh recorded of a call (its events,
its span)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from meshproc import ROOT, Mesh, wait_until

from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

ISSUER = "https://idp.test"
CI_SPIFFE = "spiffe://mesh.local/client/ci"


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
    other_ca: Path
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


def make_pki(base: Path) -> Pki:
    """Certificates (``sidemesh certs``), static tokens (``sidemesh token``) and JWTs in
    ``base``: ``ci`` and ``guest`` identities of each kind, and a ``forged`` ci certificate
    from a CA the mesh does not trust."""
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
    return Pki(certs, certs / "ca.pem", other / "ca.pem", tokens_file, jwks_file, tokens, jwts)


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


def call_event(mesh: Mesh, kind: str, timeout: float = 10, **want: Any) -> Any:
    """The ``kind`` event (``call_started``, ``permission_denied``…) matching ``want``:
    the first among the replayed ones, or the first live one within ``timeout`` seconds."""
    with grpc.insecure_channel(mesh.address) as channel:
        stream = mesh_pb2_grpc.MeshServiceStub(channel).WatchEvents(
            mesh_pb2.WatchEventsRequest(replay=1000), timeout=timeout
        )
        try:
            for event in stream:
                if event.WhichOneof("event") != kind:
                    continue
                payload = getattr(event, kind)
                if all(getattr(payload, k) == v for k, v in want.items()):
                    stream.cancel()
                    return payload
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    raise AssertionError(f"timed out after {timeout}s waiting for a {kind} event with {want}")


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
            (
                s
                for s in spans
                if s.service == "sidemesh-orchestrator" and s.kind == mesh_pb2.SPAN_KIND_SERVER
            ),
            None,
        )

    return wait_until(find, 10, f"the orchestrator's span of trace {trace_id}", interval=0.2)
