"""The ``auth:`` and ``policy:`` sections of ``sidemesh.yaml``, and a plugin's operator grant.

``auth`` says how callers prove who they are (per listener: Unix peer
credentials, TLS client certificates, bearer tokens, JWTs); ``policy`` says
what each principal may call and how fast. Principal forms are defined in
:mod:`orchestrator._principals`. With no ``auth`` and no ``policy`` the mesh is
private to its owner: the Unix socket admits only the mesh's own uid, TCP
needs the token ``sidemesh serve`` generates (``token:owner``), and only the
built-in ``group:owner`` may call anything. ``auth: {mode: off}`` opens it.

Relative paths are relative to the config file (the ``base_dir`` validation
context, as in :mod:`orchestrator._config`).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator._principals import OWNER_GROUP, check_name, check_pattern
from orchestrator._yaml_models import Problem

#: JWT signature algorithms a JWKS can verify: asymmetric only (no ``none``, no shared secrets).
JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
_DEFAULT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("RS256", "ES256")
#: What ``allow.mesh`` can grant: ``read`` (plugin status, traces, events) and ``admin``.
MeshAccess = Literal["read", "admin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_to_file(value: Any, info: ValidationInfo) -> Any:
    base = (info.context or {}).get("base_dir")
    if base is None or value is None:
        return value
    return Path(base, value).resolve()


# -- auth ------------------------------------------------------------------------


class UnixAuth(_Strict):
    """Who may use the Unix socket: by the peer's uid or gid (``SO_PEERCRED``)."""

    allowed_uids: list[int] | None = Field(
        None,
        description="uids admitted on the Unix socket, e.g. [1000, 1001] "
        "(default: only the mesh's own uid)",
    )
    allowed_gids: list[int] = Field(
        default_factory=list,
        description="gids whose processes are admitted too (the peer's primary gid), e.g. [1500]",
    )

    def uids(self) -> frozenset[int]:
        """The admitted uids: the configured ones, else the mesh's own."""
        return frozenset([os.getuid()] if self.allowed_uids is None else self.allowed_uids)

    def socket_mode(self) -> int:
        """The socket file's mode: owner-only unless other uids or gids are admitted.

        The file mode only lets others connect; ``SO_PEERCRED`` still decides.
        """
        if self.uids() - {os.getuid()}:
            return 0o666
        return 0o660 if self.allowed_gids else 0o600


class TlsSettings(_Strict):
    """TLS on the TCP listeners; with ``client_ca``, client certificates (mTLS) too."""

    cert: Path = Field(description="the server's certificate chain (PEM), e.g. certs/server.pem")
    key: Path = Field(description="the server's private key (PEM), e.g. certs/server-key.pem")
    client_ca: Path | None = Field(
        None,
        description="CA certificates (PEM) that sign client certificates, e.g. certs/ca.pem; "
        "a client certificate signed by it identifies the caller",
    )
    require_client_cert: bool = Field(
        False,
        description="true refuses TLS connections without a client certificate (needs "
        "client_ca); false also accepts bearer tokens over TLS",
    )

    _paths = field_validator("cert", "key", "client_ca")(_relative_to_file)

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsSettings:
        if self.require_client_cert and self.client_ca is None:
            raise ValueError(
                "require_client_cert needs client_ca: the CA that signs client certificates "
                "(sidemesh certs ca makes one)"
            )
        return self


class TokenSettings(_Strict):
    """Static bearer tokens: kept hashed in a secrets file, never in the config."""

    file: Path | None = Field(
        None,
        description="the secrets file, owner-only (chmod 600), of lines 'NAME: sha256:HEX' "
        "(default: <state_dir>/tokens.yaml; a missing default file means no static tokens)",
    )
    owner_token: bool = Field(
        True,
        description="generate the owner's token (token:owner) into <state_dir>/token, which "
        "the sidemesh CLI and clients on this machine use on their own",
    )

    _path = field_validator("file")(_relative_to_file)


class JwtSettings(_Strict):
    """JWT bearer tokens, verified against a JWKS file."""

    issuer: str = Field(min_length=1, description="the required 'iss', e.g. https://idp.example")
    audience: list[str] = Field(
        min_length=1, description="accepted 'aud' values (one of them must match), e.g. [sidemesh]"
    )
    jwks_file: Path = Field(
        description="the issuer's public keys as a JWKS (JSON), e.g. /etc/sidemesh/jwks.json; "
        "re-read when it changes"
    )
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=lambda: list(_DEFAULT_ALGORITHMS),
        min_length=1,
        description="accepted signature algorithms, e.g. [RS256, ES256] (asymmetric only)",
    )
    principal_claim: str = Field(
        "sub", min_length=1, description="the claim naming the caller: jwt:<value>, e.g. sub"
    )
    groups_claim: str | None = Field(
        None,
        description="a claim listing the caller's groups, e.g. groups; each value G matches "
        "jwt-group:G in policy rules",
    )
    leeway: float = Field(
        30.0, ge=0, le=300, description="seconds of clock skew allowed on exp and nbf, e.g. 30"
    )

    _path = field_validator("jwks_file")(_relative_to_file)

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class AuthConfig(_Strict):
    """``auth``: how callers prove who they are. On by default."""

    mode: Literal["on", "off"] = Field(
        "on",
        description="on: every call needs an identity and policy decides (the default); "
        "off: anyone who reaches a listener may call anything (plugins stay limited)",
    )
    unix: UnixAuth = Field(default_factory=UnixAuth, description="who may use the Unix socket")
    tls: TlsSettings | None = Field(
        None, description="TLS (and mTLS) on the TCP listeners: cert, key, client_ca"
    )
    tokens: TokenSettings = Field(default_factory=TokenSettings, description="static bearer tokens")
    jwt: JwtSettings | None = Field(None, description="JWT bearer tokens: issuer, audience, JWKS")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare on/off as true/false: `auth: {mode: off}` must work.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @property
    def on(self) -> bool:
        """Auth is enforced."""
        return self.mode == "on"


def listener_problems(auth: AuthConfig, addresses: list[str]) -> list[Problem]:
    """What is unsafe about serving ``addresses`` with ``auth``: plain TCP beyond loopback."""
    if not auth.on or auth.tls is not None:
        return []
    problems = []
    for address in addresses:
        if address.startswith("unix:"):
            continue
        host = address.rpartition(":")[0].strip("[]")
        if host == "localhost" or _is_loopback(host):
            continue
        problems.append(
            Problem(
                "listen",
                f"{address} is plain TCP beyond loopback: bearer tokens would cross the "
                "network in clear, and they are refused there",
                "add auth.tls (sidemesh certs makes development certificates), or listen on "
                "127.0.0.1",
            )
        )
    return problems


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- policy ----------------------------------------------------------------------


class RateLimits(_Strict):
    """Limits per principal: a token bucket of calls per second, and calls in flight."""

    calls_per_second: float | None = Field(
        None, gt=0, description="sustained calls per second per principal, e.g. 20"
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="calls allowed at once above the rate (default: calls_per_second, "
        "rounded up), e.g. 40",
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="calls one principal may have running at once, e.g. 8"
    )

    @model_validator(mode="after")
    def _something(self) -> RateLimits:
        if self.burst is not None and self.calls_per_second is None:
            raise ValueError("burst needs calls_per_second")
        if self.calls_per_second is None and self.max_in_flight is None:
            raise ValueError("set calls_per_second (with an optional burst) or max_in_flight")
        return self

    @property
    def bucket_size(self) -> int:
        """The token bucket's capacity."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.calls_per_second or 1))


class Allow(_Strict):
    """What a rule lets its principals call: glob patterns (``*`` crosses ``/``)."""

    agents: list[str] = Field(
        default_factory=list, description="agents as plugin/agent patterns, e.g. ['assistant/*']"
    )
    tools: list[str] = Field(
        default_factory=list,
        description="tools as plugin/tool patterns, e.g. ['tools-demo/*', '*/search']; "
        "an MCP server's tools are its plugin's tools",
    )
    mcp: list[str] = Field(
        default_factory=list,
        description="MCP servers (plugin names) whose resources, prompts and notifications "
        "may be used, e.g. ['mcp-time']",
    )
    mesh: list[MeshAccess] = Field(
        default_factory=list,
        description="the mesh's own API: read (plugins, traces, events) and/or admin",
    )

    @field_validator("agents", "tools")
    @classmethod
    def _qualified(cls, patterns: list[str], info: ValidationInfo) -> list[str]:
        kind = (info.field_name or "tools")[:-1]
        for p in patterns:
            if "/" not in p and "*" not in p:
                raise ValueError(
                    f"{p!r} never matches: {kind} patterns match qualified names plugin/{kind}; "
                    f"write 'PLUGIN/{p}' or '*/{p}'"
                )
        return patterns

    @field_validator("mcp")
    @classmethod
    def _servers(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if "/" in p:
                raise ValueError(
                    f"{p!r}: mcp patterns match MCP server (plugin) names, e.g. "
                    f"{p.split('/')[0]!r}; its tools go in allow.tools"
                )
        return patterns

    @classmethod
    def everything(cls) -> Allow:
        """Every agent, tool, MCP server and the whole mesh API."""
        return cls(agents=["*"], tools=["*"], mcp=["*"], mesh=["read", "admin"])


class Rule(_Strict):
    """One grant: these principals may call this, within these limits."""

    principals: list[str] = Field(
        min_length=1,
        description="who the rule is for, e.g. ['group:ops', 'token:ci', 'unix:uid:1000', "
        "'spiffe://mesh.local/ci/*', 'jwt:alice@example.com', 'plugin:assistant']",
    )
    allow: Allow = Field(default_factory=Allow, description="what they may call")
    limits: RateLimits | None = Field(
        None,
        description="rate and concurrency limits for each of these principals, e.g. "
        "{calls_per_second: 20, burst: 40, max_in_flight: 8}",
    )
    description: str = Field("", description="why the rule exists, for whoever reads it next")

    @field_validator("principals")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        return [check_pattern(p) for p in patterns]


class PolicyConfig(_Strict):
    """``policy``: who may call what. Deny by default when auth is on."""

    groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="named sets of principal patterns, used as group:NAME, e.g. "
        "{ops: ['unix:uid:1000', 'spiffe://mesh.local/ops/*']}; group:owner is built in",
    )
    rules: list[Rule] | None = Field(
        None,
        description="the grants, e.g. "
        "[{principals: ['token:ci'], allow: {tools: ['tools-demo/*']}}] (default: only "
        "group:owner, the mesh's own uid and token, may call everything)",
    )
    default_limits: RateLimits | None = Field(
        None,
        description="limits for principals whose rules set none, e.g. {max_in_flight: 64}",
    )

    @field_validator("groups")
    @classmethod
    def _groups(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, members in groups.items():
            check_name(name, "group")
            if name == OWNER_GROUP:
                raise ValueError(
                    "group 'owner' is built in (the mesh's own uid and token:owner); "
                    "choose another name"
                )
            for member in members:
                if member.startswith("group:"):
                    raise ValueError(
                        f"group {name!r} lists {member!r}: groups do not nest; list its "
                        "principals instead"
                    )
                check_pattern(member)
        return groups

    @model_validator(mode="after")
    def _known_groups(self) -> PolicyConfig:
        known = [*self.groups, OWNER_GROUP]
        for rule in self.rules or ():
            for p in rule.principals:
                name = p[len("group:") :] if p.startswith("group:") else None
                if name is not None and name not in known:
                    close = difflib.get_close_matches(name, known, n=1)
                    hint = f"did you mean 'group:{close[0]}'? " if close else ""
                    raise ValueError(
                        f"a rule names {p!r}, which policy.groups does not define; {hint}"
                        f"define it in policy.groups (known: {', '.join(sorted(known))})"
                    )
        return self


class PluginGrant(_Strict):
    """What the operator lets one plugin call (``plugins.<name>.permissions``).

    A plugin may call what its manifest's ``permissions`` ask for *and* the
    operator grants: this, together with any ``policy.rules`` that name
    ``plugin:<name>``. When the operator says neither, the manifest decides.
    """

    agents: list[str] = Field(
        default_factory=list, description="agent patterns granted, e.g. ['*/summarizer']"
    )
    tools: list[str] = Field(
        default_factory=list, description="tool patterns granted, e.g. ['tools-demo/*']"
    )
    mcp: list[str] = Field(
        default_factory=list, description="MCP server patterns granted, e.g. ['mcp-time']"
    )
    mesh: list[MeshAccess] = Field(
        default_factory=list, description="the mesh API granted: read and/or admin"
    )
