"""The policy engine: who may call what, as an operator writes it and as a caller is told."""

from __future__ import annotations

from typing import Any

import pytest

from clients import PermissionDeniedError
from orchestrator._auth_config import AuthConfig, PluginGrant, PolicyConfig
from orchestrator._authz import AccessDenied, PluginAccess, Policy, method_access
from orchestrator._manifest import Permissions
from orchestrator._principals import Principal
from orchestrator._yaml_models import ConfigError, validate_model

SOURCE = "/etc/sidemesh/sidemesh.yaml"
OWNER_UID = 1000

CI = Principal("token:ci", "token")
OWNER_UNIX = Principal(f"unix:uid:{OWNER_UID}", "unix", ("unix:gid:1000",))
OWNER_TOKEN = Principal("token:owner", "token")
OTHER_UNIX = Principal("unix:uid:1001", "unix", ("unix:gid:100",))
ALICE = Principal("jwt:alice@example.com", "jwt", ("jwt-group:admins",))
OPS_CERT = Principal("spiffe://mesh.local/ops/alice", "mtls")
ASSISTANT = Principal("plugin:assistant", "plugin")


def policy(
    data: dict[str, Any] | None = None,
    *,
    mode: str = "on",
    plugins: dict[str, PluginAccess] | None = None,
) -> Policy:
    config = validate_model(data or {}, PolicyConfig, SOURCE, "Sidemesh config")
    auth = AuthConfig(mode=mode)  # type: ignore[arg-type]
    return Policy(auth, config, plugins, source=SOURCE, owner_uid=OWNER_UID)


def denied(p: Policy, principal: Principal, kind: str, target: str, method: str = "") -> str:
    with pytest.raises(AccessDenied) as caught:
        p.check(principal, kind, target, method)
    return caught.value.message


EXAMPLE = {
    "groups": {"ops": ["unix:uid:1001", "spiffe://mesh.local/ops/*"]},
    "rules": [
        {
            "principals": ["group:ops", "jwt-group:admins"],
            "allow": {"tools": ["*"], "agents": ["*"], "mcp": ["*"], "mesh": ["read", "admin"]},
        },
        {
            "principals": ["token:ci"],
            "allow": {"tools": ["tools-demo/*"], "agents": ["*/assistant"]},
            "limits": {"calls_per_second": 20, "burst": 40, "max_in_flight": 8},
        },
    ],
}


# -- defaults -----------------------------------------------------------------------


def test_without_rules_only_the_owner_may_call_anything() -> None:
    p = policy()
    for owner in (OWNER_UNIX, OWNER_TOKEN):
        assert p.may(owner, "tool", "tools-demo/add")
        assert p.may(owner, "agent", "assistant/assistant")
        assert p.may(owner, "mcp", "mcp-time")
        assert p.may(owner, "mesh.read", "ListTraces")
        assert p.may(owner, "mesh.admin", "Drain")
    message = denied(p, CI, "tool", "tools-demo/add", "CallTool")
    assert message.startswith("principal 'token:ci' may not call tool 'tools-demo/add': ")
    assert "policy.rules is not set, so only group:owner" in message
    assert f"add a rule to policy.rules in {SOURCE}" in message
    assert "{principals: ['token:ci'], allow: {tools: ['tools-demo/add']}}" in message
    assert not p.may(OTHER_UNIX, "mesh.read", "ListTraces")


def test_an_unknown_kind_is_denied_even_to_the_owner() -> None:
    p = policy()
    for kind in ("admin", "read", "catalog", ""):
        assert not p.may(OWNER_TOKEN, kind, "tools-demo/add")
    assert "there is no such kind of target" in denied(p, CI, "admin", "x")


def test_mode_off_lets_every_client_call_everything() -> None:
    p = policy(mode="off")
    for who in (CI, OTHER_UNIX, Principal("anonymous", "anonymous")):
        assert p.may(who, "tool", "tools-demo/add")
        assert p.may(who, "mesh.admin", "Drain")


# -- rules, globs, groups ------------------------------------------------------------------


def test_rules_grant_by_glob_on_qualified_names_and_deny_everything_else() -> None:
    p = policy(EXAMPLE)
    assert p.may(CI, "tool", "tools-demo/add")
    assert p.may(CI, "tool", "tools-demo/slow_count")
    assert p.may(CI, "agent", "assistant/assistant")
    assert not p.may(CI, "tool", "mcp-time/get_current_time")
    assert not p.may(CI, "agent", "assistant/planner")
    assert not p.may(CI, "mesh.read", "ListTraces")
    assert not p.may(CI, "mcp", "mcp-time")
    # The owner is a group like any other once rules are written: not named, not allowed.
    assert not p.may(OWNER_TOKEN, "tool", "tools-demo/add")


def test_groups_match_members_by_glob_and_jwt_groups_by_claim() -> None:
    p = policy(EXAMPLE)
    for ops in (OTHER_UNIX, OPS_CERT, ALICE):
        assert p.may(ops, "tool", "mcp-time/get_current_time"), ops
        assert p.may(ops, "mesh.admin", "Drain"), ops
    stranger = Principal("spiffe://mesh.local/dev/bob", "mtls")
    assert not p.may(stranger, "tool", "tools-demo/add")
    bob = Principal("jwt:bob@example.com", "jwt", ("jwt-group:users",))
    assert not p.may(bob, "tool", "tools-demo/add")


def test_unix_gid_and_uid_globs() -> None:
    p = policy(
        {"rules": [{"principals": ["unix:gid:100"], "allow": {"mesh": ["read"]}},
                   {"principals": ["unix:uid:*"], "allow": {"tools": ["tools-demo/add"]}}]}
    )  # fmt: skip
    assert p.may(OTHER_UNIX, "mesh.read", "ListPlugins")
    assert not p.may(Principal("unix:uid:7", "unix", ("unix:gid:7",)), "mesh.read", "ListPlugins")
    assert p.may(Principal("unix:uid:7", "unix"), "tool", "tools-demo/add")
    assert not p.may(CI, "tool", "tools-demo/add")


def test_a_refusal_names_the_rule_to_extend() -> None:
    p = policy(EXAMPLE)
    with pytest.raises(PermissionDeniedError) as caught:
        p.check(CI, "tool", "mcp-time/get_current_time", "CallTool")
    err = caught.value
    assert isinstance(err, AccessDenied)
    assert err.message == (
        "principal 'token:ci' may not call tool 'mcp-time/get_current_time': add "
        "'mcp-time/get_current_time' (or 'mcp-time/*') to allow.tools of policy.rules[1] "
        f"(principals ['token:ci']) in {SOURCE}"
    )
    assert (err.principal, err.kind, err.target, err.method) == (
        CI, "tool", "mcp-time/get_current_time", "CallTool",
    )  # fmt: skip
    assert err.reason == "PERMISSION_DENIED"
    assert err.metadata == {
        "principal": "token:ci", "kind": "tool", "target": "mcp-time/get_current_time",
        "method": "CallTool",
    }  # fmt: skip
    assert "ErrorInfo" in err.to_status_proto().details[0].type_url

    message = denied(p, CI, "mesh.read", "ListTraces", "ListTraces")
    assert "the mesh's read API (ListTraces)" in message
    assert "add 'read' to allow.mesh of policy.rules[1]" in message


def test_a_refusal_for_a_principal_no_rule_names_proposes_a_rule() -> None:
    p = policy(EXAMPLE)
    message = denied(p, Principal("token:robot", "token"), "agent", "assistant/assistant")
    assert message == (
        "principal 'token:robot' may not call agent 'assistant/assistant': no rule of "
        f"policy.rules in {SOURCE} names it: add one, e.g. "
        "{principals: ['token:robot'], allow: {agents: ['assistant/assistant']}}"
    )


def test_listings_show_only_what_the_principal_may_call() -> None:
    p = policy(EXAMPLE)
    tools = ["tools-demo/add", "tools-demo/word_count", "mcp-time/get_current_time"]
    assert p.visible(CI, "tool", tools) == ["tools-demo/add", "tools-demo/word_count"]
    assert p.visible(OPS_CERT, "tool", tools) == tools
    assert p.visible(Principal("token:nobody", "token"), "tool", tools) == []

    class Descriptor:
        def __init__(self, name: str) -> None:
            self.qualified_name = name

    found = p.visible(CI, "tool", [Descriptor(t) for t in tools], key=lambda d: d.qualified_name)
    assert [d.qualified_name for d in found] == ["tools-demo/add", "tools-demo/word_count"]


def test_limits_come_from_the_first_rule_naming_the_principal_else_the_default() -> None:
    p = policy({**EXAMPLE, "default_limits": {"max_in_flight": 64}})
    limits, where = p.limits_for(CI)
    assert limits is not None and (limits.calls_per_second, limits.bucket_size) == (20, 40)
    assert where == "policy.rules[1].limits"
    limits, where = p.limits_for(OPS_CERT)
    assert limits is not None and limits.max_in_flight == 64
    assert where == "policy.default_limits"
    assert p.limits_for(ASSISTANT) == (None, "")


# -- plugins: manifest ∩ operator -----------------------------------------------------


def manifest(tools: list[str], agents: list[str] | None = None) -> Permissions:
    return Permissions(tools=tools, agents=agents or [])


def test_a_plugin_may_call_what_its_manifest_asks_when_the_operator_says_nothing() -> None:
    for mode in ("on", "off"):
        p = policy(mode=mode, plugins={"assistant": PluginAccess(manifest(["tools-demo/*"]))})
        assert p.may(ASSISTANT, "tool", "tools-demo/add")
        message = denied(p, ASSISTANT, "tool", "mcp-time/get_current_time", "CallTool")
        # The same message as the router gave before the policy engine existed.
        assert message == (
            "plugin 'assistant' may not call tool 'mcp-time/get_current_time': add it (or a "
            "pattern such as 'mcp-time/*') to permissions.tools in assistant's plugin.yaml"
        )
        assert not p.may(ASSISTANT, "mesh.read", "ListTraces")
        # A client-wide rule never reaches plugins: '*' is every client, not every plugin.
        p = policy(
            {"rules": [{"principals": ["*"], "allow": {"tools": ["*"]}}]},
            mode=mode,
            plugins={"assistant": PluginAccess(manifest([]))},
        )
        assert p.may(CI, "tool", "mcp-time/get_current_time")
        assert not p.may(ASSISTANT, "tool", "mcp-time/get_current_time")


def test_the_operator_narrows_a_plugin_by_grant_and_by_rules_naming_it() -> None:
    asks = manifest(["tools-demo/*", "mcp-time/*"], ["*"])
    p = policy(plugins={"assistant": PluginAccess(asks, PluginGrant(tools=["tools-demo/add"]))})
    assert p.may(ASSISTANT, "tool", "tools-demo/add")
    assert not p.may(ASSISTANT, "tool", "tools-demo/word_count")
    assert not p.may(ASSISTANT, "agent", "assistant/assistant")
    message = denied(p, ASSISTANT, "tool", "tools-demo/word_count", "CallTool")
    assert message == (
        "plugin 'assistant' may not call tool 'tools-demo/word_count': its manifest asks for "
        "it, but the operator does not grant it: add 'tools-demo/word_count' (or "
        f"'tools-demo/*') to plugins.assistant.permissions.tools in {SOURCE}"
    )
    # A grant never widens the manifest.
    wide = policy(plugins={"assistant": PluginAccess(manifest([]), PluginGrant(tools=["*"]))})
    assert not wide.may(ASSISTANT, "tool", "tools-demo/add")
    # Rules naming plugin:… grant too (with any plugins.<name>.permissions).
    by_rule = policy(
        {"groups": {"bots": ["plugin:assist*"]},
         "rules": [{"principals": ["group:bots"], "allow": {"tools": ["mcp-time/*"]}}]},
        plugins={"assistant": PluginAccess(asks)},
    )  # fmt: skip
    assert by_rule.may(ASSISTANT, "tool", "mcp-time/get_current_time")
    assert not by_rule.may(ASSISTANT, "tool", "tools-demo/add")


def test_an_unknown_or_removed_plugin_may_call_nothing() -> None:
    p = policy(plugins={"assistant": PluginAccess(manifest(["*"]))})
    assert not p.may(Principal("plugin:ghost", "plugin"), "tool", "tools-demo/add")
    assert p.may(ASSISTANT, "tool", "tools-demo/add")
    p.remove_plugin("assistant")
    assert not p.may(ASSISTANT, "tool", "tools-demo/add")
    p.set_plugin("assistant", PluginAccess(manifest(["tools-demo/add"])))
    assert p.may(ASSISTANT, "tool", "tools-demo/add")


def test_each_rpc_maps_to_a_kind() -> None:
    assert method_access("/sidemesh.v1.ToolService/CallTool") == "tool"
    assert method_access("/sidemesh.v1.MeshService/ListTools") == "catalog"
    assert method_access("/sidemesh.v1.MeshService/WatchEvents") == "mesh.read"
    assert method_access("/sidemesh.v1.McpService/ReadResource") == "mcp"
    assert method_access("/grpc.health.v1.Health/Check") == "open"
    assert method_access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == (
        "mesh.read"
    )
    assert method_access("/sidemesh.v1.MeshService/SomethingNew") == "mesh.admin"


# -- the config: errors name the field and the fix ------------------------------------------


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_model(data, PolicyConfig, SOURCE, "Sidemesh config")
    return str(caught.value)


def test_config_errors_say_how_to_fix_them() -> None:
    text = problems({"rules": [{"principals": ["group:opz"], "allow": {}}], "groups": {"ops": []}})
    assert "a rule names 'group:opz', which policy.groups does not define" in text
    assert "did you mean 'group:ops'?" in text

    text = problems({"rules": [{"principals": ["uid:1000"]}]})
    assert "field 'rules[0].principals'" in text
    assert "did you mean 'unix:uid:1000'?" in text

    text = problems({"rules": [{"principals": ["anonymous"]}]})
    assert "'anonymous' cannot be granted" in text

    text = problems({"rules": [{"principals": ["token:ci"], "allow": {"tools": ["add"]}}]})
    assert "field 'rules[0].allow.tools'" in text
    assert "write 'PLUGIN/add' or '*/add'" in text

    text = problems({"rules": [{"principals": ["token:ci"], "allow": {"mesh": ["write"]}}]})
    assert "field 'rules[0].allow.mesh[0]'" in text

    text = problems({"rules": [{"principals": ["token:ci"], "alow": {}}]})
    assert "did you mean 'allow'?" in text

    text = problems({"groups": {"owner": ["token:x"]}})
    assert "group 'owner' is built in" in text

    text = problems({"groups": {"a": ["group:b"]}})
    assert "groups do not nest" in text

    text = problems({"rules": [{"principals": ["token:ci"], "limits": {"burst": 3}}]})
    assert "burst needs calls_per_second" in text
    text = problems({"rules": [{"principals": ["token:ci"], "limits": {}}]})
    assert "set calls_per_second" in text
