"""Authorization: one engine that decides what each principal, client or plugin, may call.

::

    policy = Policy(config.auth, config.policy, {name: PluginAccess(manifest.permissions,
                                                                    override.permissions)},
                    source=str(config_path))
    policy.check(principal, "tool", "tools-demo/add", "CallTool")   # or AccessDenied
    policy.may(principal, "mesh.read", "ListTraces")                 # -> bool
    policy.visible(principal, "tool", descriptors, key=lambda d: d.qualified_name)

Kinds: ``agent`` and ``tool`` (targets are qualified names, ``plugin/name``),
``mcp`` (an MCP server's plugin name: its resources, prompts, completions and
notifications; its tools are ``tool``), ``mesh.read`` (plugin status,
traces, events, reflection) and ``mesh.admin``. :func:`method_access` maps
each RPC to its kind.

- **Clients** (every principal but ``plugin:…``): with ``auth.mode: on``, what
  the ``policy.rules`` that name them (directly, by glob, or by ``group:``)
  allow, and nothing else. Unset rules mean one rule: ``group:owner`` (the
  mesh's own uid and ``token:owner``) may call everything. With ``off``:
  everything.
- **Plugins**, in both modes: what their manifest's ``permissions`` ask for,
  intersected with what the operator grants: ``plugins.<name>.permissions``
  and ``policy.rules`` naming ``plugin:<name>``, together; when the operator
  says neither, the manifest decides (as before this policy existed).

Decisions are cached per principal and target; patterns are compiled once
(one regular expression per kind and principal).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from orchestrator._auth_config import (
    Allow,
    AuthConfig,
    PluginGrant,
    PolicyConfig,
    RateLimits,
    Rule,
)
from orchestrator._principals import OWNER_GROUP, OWNER_TOKEN, Principal, compile_globs
from sidemesh.core import PermissionDeniedError

Kind = Literal["agent", "tool", "mcp", "mesh.read", "mesh.admin"]
T = TypeVar("T")

_FIELDS: dict[str, str] = {
    "agent": "agents", "tool": "tools", "mcp": "mcp", "mesh.read": "mesh", "mesh.admin": "mesh",
}  # fmt: skip
_CACHE_SIZE = 4096

#: How each RPC is authorized: a kind checked against its target; ``catalog``: any
#: principal, its listing filtered by :meth:`Policy.visible`; ``authenticated``: any
#: principal; ``open``: no credential needed.
METHOD_ACCESS: dict[str, str] = {
    "/sidemesh.v1.AgentService/Invoke": "agent",
    "/sidemesh.v1.AgentService/Chat": "agent",
    "/sidemesh.v1.ToolService/CallTool": "tool",
    "/sidemesh.v1.ToolService/ListTools": "catalog",
    "/sidemesh.v1.McpService/CallTool": "tool",  # the target is server/tool
    "/sidemesh.v1.McpService/ListTools": "mcp",  # and its tools filtered as "tool"
    "/sidemesh.v1.MeshService/ListAgents": "catalog",
    "/sidemesh.v1.MeshService/ListTools": "catalog",
    "/sidemesh.v1.MeshService/GetAgent": "agent",
    "/sidemesh.v1.MeshService/GetTool": "tool",
    "/sidemesh.v1.MeshService/ListPlugins": "mesh.read",
    "/sidemesh.v1.MeshService/GetPlugin": "mesh.read",
    "/sidemesh.v1.MeshService/WatchEvents": "mesh.read",
    "/sidemesh.v1.MeshService/ListTraces": "mesh.read",
    "/sidemesh.v1.MeshService/GetTrace": "mesh.read",
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export": "authenticated",
    "/grpc.health.v1.Health/Check": "open",
    "/grpc.health.v1.Health/Watch": "open",
}


def method_access(path: str) -> str:
    """How the RPC ``/package.Service/Method`` is authorized (see :data:`METHOD_ACCESS`).

    The other ``McpService`` RPCs are ``mcp`` (the target is the server);
    server reflection is ``mesh.read``; anything unknown is ``mesh.admin``.
    """
    access = METHOD_ACCESS.get(path)
    if access is not None:
        return access
    if path.startswith("/sidemesh.v1.McpService/"):
        return "mcp"
    if path.startswith("/grpc.reflection."):
        return "mesh.read"
    return "mesh.admin"


class Permissions(Protocol):
    """A manifest's ``permissions``: patterns of what the plugin asks to call."""

    @property
    def tools(self) -> list[str]: ...

    @property
    def agents(self) -> list[str]: ...


@dataclass(frozen=True)
class PluginAccess:
    """One plugin's side of the intersection: its manifest's ask and the operator's grant."""

    manifest: Permissions
    #: ``plugins.<name>.permissions``; None when the operator set none.
    grant: PluginGrant | None = None


class AccessDenied(PermissionDeniedError):
    """``PERMISSION_DENIED``: a known principal may not make this call.

    The message says which rule (or manifest line) to add. ``principal``,
    ``kind``, ``target`` and ``method`` are what the ``permission_denied``
    event needs; the ``ErrorInfo`` detail carries them too.
    """

    def __init__(self, message: str, principal: Principal, kind: str, target: str, method: str):
        meta = {"principal": principal.name, "kind": kind, "target": target, "method": method}
        if principal.is_plugin:
            meta["caller"] = principal.plugin
        super().__init__(message, reason="PERMISSION_DENIED", metadata=meta)
        self.principal = principal
        self.kind = kind
        self.target = target
        self.method = method


class _Patterns:
    """Compiled allow patterns: one regex per target kind, and the mesh API flags."""

    __slots__ = ("admin", "agent", "mcp", "read", "tool")

    def __init__(self, allows: Iterable[Any]) -> None:
        allows = list(allows)
        self.agent = compile_globs([p for a in allows for p in a.agents])
        self.tool = compile_globs([p for a in allows for p in a.tools])
        self.mcp = compile_globs([p for a in allows for p in getattr(a, "mcp", ())])
        mesh = {m for a in allows for m in getattr(a, "mesh", ())}
        self.read = "read" in mesh
        self.admin = "admin" in mesh

    def allows(self, kind: str, target: str) -> bool:
        if kind == "tool":
            pattern = self.tool
        elif kind == "agent":
            pattern = self.agent
        elif kind == "mcp":
            pattern = self.mcp
        else:
            return self.read if kind == "mesh.read" else kind == "mesh.admin" and self.admin
        return pattern is not None and pattern.match(target) is not None


_EVERYTHING = _Patterns([Allow.everything()])


@dataclass(slots=True)
class _Grant:
    """What one principal may call, compiled, with its decision cache."""

    patterns: _Patterns
    #: For a plugin: the manifest's side (``patterns`` is then the operator's).
    manifest: _Patterns | None
    rules: tuple[int, ...]
    limits: tuple[RateLimits | None, str]
    decisions: dict[tuple[str, str], bool] = field(default_factory=dict)

    def may(self, kind: str, target: str) -> bool:
        key = (kind, target)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.patterns.allows(kind, target) and (
                self.manifest is None or self.manifest.allows(kind, target)
            )
            if len(self.decisions) >= _CACHE_SIZE:
                self.decisions.clear()
            self.decisions[key] = decision
        return decision


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    clients: re.Pattern[str] | None  # over principal names and groups
    plugins: re.Pattern[str] | None  # over plugin:NAME


class Policy:
    """The mesh's one authorization engine (see the module docstring). Thread-safe."""

    def __init__(
        self,
        auth: AuthConfig,
        policy: PolicyConfig,
        plugins: Mapping[str, PluginAccess] | None = None,
        *,
        source: str = "sidemesh.yaml",
        owner_uid: int | None = None,
    ) -> None:
        self._on = auth.on
        self._source = source
        self._explicit_rules = policy.rules is not None
        owner = [f"unix:uid:{os.getuid() if owner_uid is None else owner_uid}",
                 f"token:{OWNER_TOKEN}"]  # fmt: skip
        groups = {**policy.groups, OWNER_GROUP: owner}
        rules = policy.rules
        if rules is None:
            rules = [Rule(principals=[f"group:{OWNER_GROUP}"], allow=Allow.everything())]
        self._rules = [_compile_rule(r, groups) for r in rules]
        self._default_limits = policy.default_limits
        self._plugins = dict(plugins or {})
        self._grants: dict[Principal, _Grant] = {}
        self._lock = threading.Lock()

    # -- plugins come and go ---------------------------------------------------

    def set_plugin(self, name: str, access: PluginAccess) -> None:
        """Adds or replaces a plugin's manifest permissions and grant."""
        with self._lock:
            self._plugins[name] = access
            self._grants = {p: g for p, g in self._grants.items() if p.plugin != name}

    def remove_plugin(self, name: str) -> None:
        """Forgets a plugin: its principal may call nothing."""
        self.set_plugin(name, PluginAccess(_NoPermissions(), PluginGrant()))

    # -- decisions ---------------------------------------------------------------

    def may(self, principal: Principal, kind: str, target: str) -> bool:
        """True when ``principal`` may call ``kind`` ``target`` (a qualified name, an MCP
        server, or for ``mesh.*`` the method)."""
        grant = self._grants.get(principal) or self._grant(principal)
        return grant.may(kind, target)

    def check(self, principal: Principal, kind: str, target: str, method: str = "") -> None:
        """Raises :class:`AccessDenied` (``PERMISSION_DENIED``) unless ``principal`` may."""
        grant = self._grants.get(principal) or self._grant(principal)
        if not grant.may(kind, target):
            raise AccessDenied(
                self._refusal(principal, grant, kind, target, method),
                principal, kind, target, method,
            )  # fmt: skip

    def visible(
        self,
        principal: Principal,
        kind: str,
        items: Iterable[T],
        key: Callable[[T], str] | None = None,
    ) -> list[T]:
        """The ``items`` (names, or objects named by ``key``) ``principal`` may call."""
        grant = self._grants.get(principal) or self._grant(principal)
        name = key or str
        return [item for item in items if grant.may(kind, name(item))]

    def limits_for(self, principal: Principal) -> tuple[RateLimits | None, str]:
        """The limits of ``principal`` and where they are set (``policy.rules[1].limits``):
        those of the first rule naming it that sets any, else ``policy.default_limits``
        (for clients), else none."""
        grant = self._grants.get(principal) or self._grant(principal)
        return grant.limits

    def rules_for(self, principal: Principal) -> list[int]:
        """Indices in ``policy.rules`` of the rules that name ``principal``."""
        grant = self._grants.get(principal) or self._grant(principal)
        return list(grant.rules) if self._explicit_rules else []

    # -- compiling a principal's grant ---------------------------------------------

    def _grant(self, principal: Principal) -> _Grant:
        with self._lock:
            names = (principal.name, *principal.groups)
            rules = tuple(
                i
                for i, r in enumerate(self._rules)
                if _names_match(r.plugins if principal.is_plugin else r.clients, names)
            )
            limits = next(
                ((self._rules[i].rule.limits, f"policy.rules[{i}].limits")
                 for i in rules if self._rules[i].rule.limits is not None),
                (None, "") if principal.is_plugin or self._default_limits is None
                else (self._default_limits, "policy.default_limits"),
            )  # fmt: skip
            allows = [self._rules[i].rule.allow for i in rules]
            manifest = None
            if principal.is_plugin:
                access = self._plugins.get(principal.plugin)
                if access is None:
                    patterns, manifest = _Patterns([]), _Patterns([])
                else:
                    manifest = _Patterns([access.manifest])
                    said = allows + ([access.grant] if access.grant is not None else [])
                    patterns = _Patterns(said) if said else _EVERYTHING
            elif not self._on:
                patterns = _EVERYTHING
            else:
                patterns = _Patterns(allows)
            grant = _Grant(patterns, manifest, rules, limits)
            if len(self._grants) >= _CACHE_SIZE:
                self._grants = {}
            self._grants[principal] = grant
            return grant

    # -- messages ------------------------------------------------------------------

    def _refusal(
        self, principal: Principal, grant: _Grant, kind: str, target: str, method: str
    ) -> str:
        what = _describe(kind, target, method)
        field_ = _FIELDS.get(kind, kind)
        suggestion = _suggest(kind, target)
        if principal.is_plugin:
            name = principal.plugin
            head = f"plugin {name!r} may not call {what}"
            if grant.manifest is not None and not grant.manifest.allows(kind, target):
                if kind.startswith("mesh."):
                    return f"{head}: plugins have no access to the mesh's own API"
                plugin = target.partition("/")[0]
                pattern = f"'{plugin}/*'" if "/" in target else f"'{target}'"
                return (
                    f"{head}: add it (or a pattern such as {pattern}) to permissions.{field_} "
                    f"in {name}'s plugin.yaml"
                )
            return (
                f"{head}: its manifest asks for it, but the operator does not grant it: add "
                f"{suggestion} to plugins.{name}.permissions.{field_} in {self._source}"
            )
        head = f"principal {principal.name!r} may not call {what}"
        if kind not in _FIELDS:
            return f"{head}: there is no such kind of target"
        first = suggestion.split(" ")[0]
        example = f"{{principals: [{principal.name!r}], allow: {{{field_}: [{first}]}}}}"
        if not self._explicit_rules:
            return (
                f"{head}: policy.rules is not set, so only group:owner (the mesh's own uid and "
                f"token:owner) may call anything: add a rule to policy.rules in {self._source}, "
                f"e.g. {example}"
            )
        if grant.rules:
            i = grant.rules[0]
            return (
                f"{head}: add {suggestion} to allow.{field_} of policy.rules[{i}] (principals "
                f"{self._rules[i].rule.principals}) in {self._source}"
            )
        return (
            f"{head}: no rule of policy.rules in {self._source} names it: add one, e.g. {example}"
        )


class _NoPermissions:
    tools: list[str] = []
    agents: list[str] = []


def _compile_rule(rule: Rule, groups: Mapping[str, Sequence[str]]) -> _CompiledRule:
    patterns: list[str] = []
    for p in rule.principals:
        if p.startswith("group:"):
            patterns += groups[p[len("group:") :]]
        else:
            patterns.append(p)
    plugins = [p for p in patterns if p.startswith("plugin:")]
    clients = [p for p in patterns if not p.startswith("plugin:")]
    return _CompiledRule(rule, compile_globs(clients), compile_globs(plugins))


def _names_match(pattern: re.Pattern[str] | None, names: tuple[str, ...]) -> bool:
    return pattern is not None and any(pattern.match(n) for n in names)


def _describe(kind: str, target: str, method: str) -> str:
    if kind == "mesh.read":
        return f"the mesh's read API ({method or target})"
    if kind == "mesh.admin":
        return f"the mesh's admin API ({method or target})"
    noun = {"agent": "agent", "tool": "tool", "mcp": "MCP server"}.get(kind, kind)
    return f"{noun} {target!r}"


def _suggest(kind: str, target: str) -> str:
    if kind == "mesh.read":
        return "'read'"
    if kind == "mesh.admin":
        return "'admin'"
    plugin, sep, _ = target.partition("/")
    if sep:
        return f"'{target}' (or '{plugin}/*')"
    return f"'{target}'"
