"""Access: authentication, policy and limits together, as the listeners call them per call."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator._access import Access
from orchestrator._auth_config import AuthConfig, PolicyConfig
from orchestrator._authn import AuthenticationError
from orchestrator._authz import AccessDenied, PluginAccess
from orchestrator._limits import RateLimited
from orchestrator._manifest import Permissions
from orchestrator._principals import TransportIdentity
from orchestrator._tokens import add_secret, new_token

LOOPBACK = TransportIdentity.tcp(loopback=True)


@pytest.fixture
def access(tmp_path: Path) -> tuple[Access, str, str]:
    ci = new_token()
    add_secret(tmp_path / "tokens.yaml", "ci", ci)
    auth = AuthConfig.model_validate({"tokens": {"file": str(tmp_path / "tokens.yaml")}})
    policy = PolicyConfig.model_validate(
        {"rules": [
            {"principals": ["group:owner"], "allow": {"tools": ["*"], "mesh": ["read"]}},
            {"principals": ["token:ci"], "allow": {"tools": ["tools-demo/*"]},
             "limits": {"max_in_flight": 1}},
        ]}
    )  # fmt: skip
    plugins = {"assistant": PluginAccess(Permissions(tools=["tools-demo/add"]))}
    a = Access(auth, policy, plugins, tmp_path / "state", source="/etc/sidemesh.yaml")
    assert a.authenticator.token_file is not None
    return a, a.authenticator.token_file.read_text().strip(), ci


def test_an_allowed_call_is_admitted_and_released(access: tuple[Access, str, str]) -> None:
    a, owner, ci = access
    principal = a.admit(LOOPBACK, f"Bearer {ci}", "tool", "tools-demo/add", "CallTool")
    assert principal.name == "token:ci"
    assert a.limits.in_flight(principal) == 1
    with pytest.raises(RateLimited):  # its one slot is taken
        a.admit(LOOPBACK, f"Bearer {ci}", "tool", "tools-demo/add", "CallTool")
    a.release(principal)
    assert a.limits.in_flight(principal) == 0
    me = TransportIdentity.unix(os.getuid(), os.getgid(), 1)
    assert a.admit(me, None, "mesh.read", "ListTraces").name == f"unix:uid:{os.getuid()}"
    assert a.admit(LOOPBACK, f"Bearer {owner}", "tool", "mcp-time/x").name == "token:owner"


def test_each_refusal_has_its_own_status(access: tuple[Access, str, str]) -> None:
    a, _, ci = access
    with pytest.raises(AuthenticationError) as unauthenticated:
        a.admit(LOOPBACK, None, "tool", "tools-demo/add", "CallTool")
    assert unauthenticated.value.code.name == "UNAUTHENTICATED"
    with pytest.raises(AccessDenied) as denied:
        a.admit(LOOPBACK, f"Bearer {ci}", "tool", "mcp-time/x", "CallTool")
    assert denied.value.code.name == "PERMISSION_DENIED"
    assert "to allow.tools of policy.rules[1] (principals ['token:ci']) in /etc/sidemesh.yaml" in (
        denied.value.message
    )
    assert a.limits.in_flight(denied.value.principal) == 0  # a refused call takes no slot


def test_a_plugin_is_limited_to_its_manifest_on_its_socket_and_a_stranger_over_tcp(
    access: tuple[Access, str, str],
) -> None:
    a, _, _ = access
    socket = TransportIdentity.plugin("assistant")
    assert a.admit(socket, None, "tool", "tools-demo/add").name == "plugin:assistant"
    with pytest.raises(AccessDenied, match=r"permissions\.tools in assistant's plugin\.yaml"):
        a.admit(socket, None, "tool", "tools-demo/word_count")
    # A sandboxed plugin granted network reaches the TCP listener as anyone else would: with
    # no credential of its own (its sandbox hides the state dir's token), it is refused.
    with pytest.raises(AuthenticationError, match="the call has no credential"):
        a.admit(LOOPBACK, None, "tool", "tools-demo/add")
    with pytest.raises(AuthenticationError, match="not one this mesh knows"):
        a.admit(LOOPBACK, "Bearer plugin:assistant", "tool", "tools-demo/add")
