"""The Node.js example proves who it is like the Python client: a bearer token (plain
loopback TCP or TLS), a client certificate (mTLS), or the local mesh's owner token; and
what it prints when the mesh refuses it.

``clients/node/example.mjs`` reads ``SIDEMESH_TOKEN`` / ``SIDEMESH_TOKEN_FILE`` and
``SIDEMESH_TLS_CA`` / ``_CERT`` / ``_KEY``; each admitted call's principal is the one the
mesh records in its events.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from authkit import CI_SPIFFE, Pki, call_event, make_pki
from meshproc import EXAMPLE_PLUGINS, ROOT, Mesh

pytestmark = pytest.mark.integration

DEMO = [str(EXAMPLE_PLUGINS / "tools-demo"), str(EXAMPLE_PLUGINS / "assistant")]
#: The owner; the ci identities may use the demo (the example calls a tool and an agent);
#: the guest's certificate is valid but allowed nothing the example calls.
POLICY: dict[str, Any] = {
    "rules": [
        {"principals": ["group:owner"],
         "allow": {"tools": ["*"], "agents": ["*"], "mcp": ["*"], "mesh": ["read", "admin"]}},
        {"principals": ["token:ci", CI_SPIFFE],
         "allow": {"tools": ["tools-demo/*"], "agents": ["assistant/*"]}},
        {"principals": ["dns:guest.local"], "allow": {"agents": ["assistant/*"]}},
    ]
}  # fmt: skip
CREDENTIAL_VARIABLES = (
    "SIDEMESH_TOKEN", "SIDEMESH_TOKEN_FILE", "SIDEMESH_TLS_CA", "SIDEMESH_TLS_CERT",
    "SIDEMESH_TLS_KEY", "SIDEMESH_ADDRESS",
)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _start(workdir: Path, **config: Any) -> Mesh:
    mesh = Mesh(workdir, plugin_dirs=DEMO, policy=POLICY, **config)
    try:
        mesh.start(ready=["tools-demo", "assistant"])
    except BaseException:
        mesh.cleanup()
        raise
    return mesh


def _stop(mesh: Mesh) -> None:
    try:
        mesh.stop()
        assert mesh.sidecars() == [], f"processes outlived the mesh\n{mesh.log()}"
    finally:
        mesh.cleanup()


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mesh]:
    """TLS on TCP with client certificates (and tokens) accepted."""
    mesh = _start(tmp_path_factory.mktemp("node-tls"), auth=pki.auth(require_client_cert=False))
    yield mesh
    _stop(mesh)


@pytest.fixture(scope="module")
def plain_mesh(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mesh]:
    """Plain loopback TCP; its state dir where clients look by default ($XDG_STATE_HOME)."""
    xdg = tmp_path_factory.mktemp("node-xdg")
    mesh = _start(
        tmp_path_factory.mktemp("node-plain"), auth=pki.auth(), state_dir=str(xdg / "sidemesh")
    )
    yield mesh
    _stop(mesh)


def _localhost(mesh: Mesh) -> str:
    """The TLS listener by name, as a TLS client names a server (the certificate has it;
    node warns that a TLS server name may not be an IP address, RFC 6066)."""
    return "localhost:" + mesh.tcp_address.rpartition(":")[2]


async def node_example(address: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``node example.mjs ADDRESS`` with only these credential variables set."""
    node = shutil.which("node")
    assert node, "node is part of this machine kind (make setup needs it for npm ci)"
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    base["XDG_STATE_HOME"] = env.pop("XDG_STATE_HOME", "/nonexistent")
    return await asyncio.to_thread(
        subprocess.run, [node, str(ROOT / "clients" / "node" / "example.mjs"), address],
        capture_output=True, text=True, timeout=60, env={**base, **env},
    )  # fmt: skip


def assert_ran_as(mesh: Mesh, out: subprocess.CompletedProcess[str], principal: str) -> None:
    """The example did everything it does, and the mesh saw ``principal`` make its calls."""
    assert out.returncode == 0, out.stderr
    assert 'tools-demo/add -> {"result":42}' in out.stdout
    assert "assistant: 2 + 3 = 5" in out.stdout
    assert "tools-demo/nope -> NOT_FOUND: no tool named 'tools-demo/nope'" in out.stdout
    trace_id = re.search(r"^trace ([0-9a-f]{32})$", out.stdout, re.M)
    assert trace_id, out.stdout
    tool = call_event(mesh, "call_started", trace_id=trace_id.group(1), target="tools-demo/add",
                      caller="")  # fmt: skip
    assert tool.principal == principal
    agent = call_event(mesh, "call_started", trace_id=trace_id.group(1),
                       target="assistant/assistant")  # fmt: skip
    assert agent.principal == principal


async def test_a_client_certificate_is_its_principal(tls_mesh: Mesh, pki: Pki) -> None:
    cert, key = pki.cert("ci")
    out = await node_example(
        _localhost(tls_mesh),
        SIDEMESH_TLS_CA=str(pki.ca), SIDEMESH_TLS_CERT=str(cert), SIDEMESH_TLS_KEY=str(key),
    )  # fmt: skip
    assert_ran_as(tls_mesh, out, CI_SPIFFE)


async def test_a_token_over_tls_is_its_principal(tls_mesh: Mesh, pki: Pki) -> None:
    out = await node_example(
        _localhost(tls_mesh),
        SIDEMESH_TLS_CA=str(pki.ca), SIDEMESH_TOKEN_FILE=str(pki.dir.parent / "ci.token"),
    )  # fmt: skip
    assert_ran_as(tls_mesh, out, "token:ci")


async def test_tls_without_a_credential_is_told_how_to_authenticate(
    tls_mesh: Mesh, pki: Pki
) -> None:
    out = await node_example(_localhost(tls_mesh), SIDEMESH_TLS_CA=str(pki.ca))
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("error: UNAUTHENTICATED: the call has no credential"), out.stderr
    assert f"or a client certificate signed by {pki.ca}" in out.stderr


async def test_a_certificate_not_allowed_is_told_which_rule_to_add(
    tls_mesh: Mesh, pki: Pki
) -> None:
    cert, key = pki.cert("guest")
    out = await node_example(
        _localhost(tls_mesh),
        SIDEMESH_TLS_CA=str(pki.ca), SIDEMESH_TLS_CERT=str(cert), SIDEMESH_TLS_KEY=str(key),
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert out.stdout.startswith("tools: \n"), out.stdout  # it may call no tool: it sees none
    assert out.stderr.startswith(
        "error: PERMISSION_DENIED: principal 'dns:guest.local' may not call tool "
        "'tools-demo/add': add 'tools-demo/add' (or 'tools-demo/*') to allow.tools of "
        "policy.rules[2]"
    ), out.stderr


async def test_an_expired_jwt_is_refused(tls_mesh: Mesh, pki: Pki) -> None:
    out = await node_example(
        _localhost(tls_mesh), SIDEMESH_TLS_CA=str(pki.ca), SIDEMESH_TOKEN=pki.jwts["expired"]
    )
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("error: UNAUTHENTICATED: the JWT expired at"), out.stderr


async def test_a_token_over_loopback_tcp_is_its_principal(plain_mesh: Mesh, pki: Pki) -> None:
    out = await node_example(plain_mesh.tcp_address, SIDEMESH_TOKEN=pki.tokens["ci"])
    assert_ran_as(plain_mesh, out, "token:ci")


async def test_a_wrong_token_is_refused(plain_mesh: Mesh) -> None:
    out = await node_example(plain_mesh.tcp_address, SIDEMESH_TOKEN="smt_" + "n" * 43)
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith(
        "error: UNAUTHENTICATED: the bearer token is not one this mesh knows"
    ), out.stderr


async def test_it_finds_the_local_meshs_owner_token(plain_mesh: Mesh) -> None:
    out = await node_example(
        plain_mesh.tcp_address, XDG_STATE_HOME=str(plain_mesh.state_dir.parent)
    )
    assert_ran_as(plain_mesh, out, "token:owner")
    out = await node_example(plain_mesh.tcp_address)  # another state dir: no token
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("error: UNAUTHENTICATED: the call has no credential"), out.stderr
    assert f"the mesh owner's token is in {plain_mesh.state_dir / 'token'}" in out.stderr
