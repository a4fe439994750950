"""``mcp:`` in ``sidemesh.yaml``: the mesh as an MCP gateway (HTTP, auth, virtual servers)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

#: MCP's tool and prompt names: 1-128 of these characters.
_MCP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class McpHttpSettings(_Strict):
    """The streamable-HTTP MCP endpoint that ``sidemesh serve`` runs."""

    enabled: bool = Field(False, description="true serves MCP over streamable HTTP")
    listen: str = Field(
        "127.0.0.1:8765", description="host:port of the HTTP listener (port 0: any free port)"
    )
    path: str = Field("/mcp", description="the path of the whole mesh's MCP endpoint, e.g. /mcp")
    responses: Literal["auto", "sse", "json"] = Field(
        "auto",
        description="how a POST is answered: auto (one JSON body unless the call may need a "
        "stream: a progress token, logs, or a server request the client can answer), sse "
        "(always an SSE stream), json (always one JSON body: no progress or server requests)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host headers accepted besides loopback ones (DNS rebinding protection), "
        "e.g. ['mesh.example.com:443']",
    )
    session_idle_timeout: float = Field(
        1800.0, gt=0, description="seconds an idle MCP session is kept before it is closed"
    )
    event_history: int = Field(
        1000,
        ge=0,
        description="SSE events kept per stream for resumption (Last-Event-ID); 0 turns "
        "resumability off",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.startswith("/") or (path.endswith("/") and path != "/"):
            raise ValueError("a path starts with '/' and does not end with one, e.g. /mcp")
        return path

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("give host:port, e.g. 127.0.0.1:8765")
        return listen


class McpAuthSettings(_Strict):
    """MCP authorization of the HTTP endpoint: OAuth 2.1 bearer JWTs (a resource server)."""

    enabled: bool = Field(False, description="true requires a valid bearer token on every call")
    resource: str | None = Field(
        None,
        description="this endpoint's resource URI (RFC 9728 `resource`, the tokens' audience), "
        "e.g. https://mesh.example.com/mcp; default: the endpoint's URL",
    )
    authorization_servers: list[str] = Field(
        default_factory=list,
        description="issuer URLs of the authorization servers clients get tokens from",
    )
    jwks_file: Path | None = Field(
        None, description="JSON Web Key Set (a file) whose keys sign the accepted tokens"
    )
    issuers: list[str] = Field(
        default_factory=list,
        description="accepted `iss` values (default: authorization_servers)",
    )
    audiences: list[str] = Field(
        default_factory=list, description="accepted `aud` values (default: the resource URI)"
    )
    required_scopes: list[str] = Field(
        default_factory=list, description="scopes every token must carry, e.g. ['mcp']"
    )
    scopes_supported: list[str] = Field(
        default_factory=list, description="scopes listed in the protected-resource metadata"
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"],
        description="accepted JWS algorithms",
    )
    leeway: float = Field(30.0, ge=0, description="seconds of clock skew tolerated")

    @field_validator("jwks_file")
    @classmethod
    def _relative_to_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base = (info.context or {}).get("base_dir")
        return Path(base, value).resolve() if value is not None and base else value

    @model_validator(mode="after")
    def _complete(self) -> McpAuthSettings:
        if self.enabled and self.jwks_file is None:
            raise ValueError("mcp.auth.enabled needs jwks_file: the keys that sign the tokens")
        return self


class VirtualServer(_Strict):
    """A named MCP server made of some of the mesh's tools, resources and prompts."""

    path: str | None = Field(None, description="its HTTP path (default: <mcp.http.path>/<name>)")
    title: str | None = Field(None, description="the title MCP clients show")
    instructions: str | None = Field(None, description="instructions for the model")
    tools: list[str] = Field(
        default_factory=list,
        description="globs of tools and agents by mesh name, e.g. ['mcp-time/*', 'tools-demo/add']",
    )
    resources: list[str] = Field(
        default_factory=list,
        description="globs of plugin/URI (templates too), e.g. ['mcp-everything/demo://*']",
    )
    prompts: list[str] = Field(
        default_factory=list, description="globs of prompts by mesh name, e.g. ['mcp-everything/*']"
    )
    rename: dict[str, str] = Field(
        default_factory=dict,
        description="MCP names for tools, agents and prompts, by mesh name, "
        "e.g. {'mcp-time/get_current_time': now}",
    )
    descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="description overrides by mesh name (plugin/tool, plugin/prompt, plugin/URI)",
    )
    principals: list[str] = Field(
        default_factory=list,
        description="globs of the principals that may use it, e.g. ['jwt:alice', 'token:ci'] "
        "(empty: every authenticated client)",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, path: str | None) -> str | None:
        if path is not None and (not path.startswith("/") or path.endswith("/")):
            raise ValueError("a path starts with '/' and does not end with one, e.g. /mcp/ops")
        return path

    @field_validator("rename")
    @classmethod
    def _names(cls, rename: dict[str, str]) -> dict[str, str]:
        bad = [n for n in rename.values() if not _MCP_NAME.match(n)]
        if bad:
            raise ValueError(f"MCP names are 1-128 of A-Z a-z 0-9 _ . - ; not {bad}")
        if len(set(rename.values())) != len(rename):
            raise ValueError("two entries of rename give the same name")
        return rename


class McpGatewaySettings(_Strict):
    """The mesh as an MCP server: ``sidemesh mcp`` (stdio) and the streamable-HTTP endpoint."""

    http: McpHttpSettings = Field(
        default_factory=McpHttpSettings, description="the streamable-HTTP endpoint"
    )
    auth: McpAuthSettings = Field(
        default_factory=McpAuthSettings, description="MCP authorization of the HTTP endpoint"
    )
    servers: dict[str, VirtualServer] = Field(
        default_factory=dict,
        description="virtual MCP servers by name, each served at its own path "
        "(and by `sidemesh mcp --server NAME`)",
    )

    @field_validator("servers")
    @classmethod
    def _server_names(cls, servers: dict[str, VirtualServer]) -> dict[str, VirtualServer]:
        bad = [n for n in servers if not _SERVER_NAME.match(n)]
        if bad:
            raise ValueError(f"server names are lowercase letters, digits and '-'; not {bad}")
        return servers

    def server_path(self, name: str) -> str:
        """The HTTP path of virtual server ``name``."""
        server = self.servers[name]
        return server.path or f"{self.http.path.rstrip('/')}/{name}"

    @model_validator(mode="after")
    def _distinct_paths(self) -> McpGatewaySettings:
        paths = [self.http.path, *(self.server_path(n) for n in self.servers)]
        if len(set(paths)) != len(paths):
            raise ValueError(f"two MCP endpoints have the same path: {paths}")
        return self
