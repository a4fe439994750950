"""The plugin manifest, ``plugin.yaml``: who a plugin is, what it provides, what it needs."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from orchestrator import _variables
from orchestrator._variables import Expandable
from orchestrator._yaml_models import Problem, load_yaml_model
from sidemesh.core import ItemName, PluginName, normalize_address

MANIFEST_FILE = "plugin.yaml"

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provides(_Strict):
    """What the plugin declares it offers; checked against ``Describe`` when it starts."""

    agents: list[ItemName] = Field(
        default_factory=list, description="agent names, e.g. [assistant]"
    )
    tools: list[ItemName] = Field(
        default_factory=list, description="tool names, e.g. [add, search]"
    )
    mcp: bool = Field(False, description="true when the plugin bridges an MCP server")


class SandboxNeeds(_Strict):
    """What the plugin needs from the machine. The operator's config can tighten or grant."""

    network: bool = Field(
        False,
        description="true asks for network access; granted only when the operator allows it",
    )
    memory_mb: int = Field(512, gt=0, le=1 << 20, description="memory limit in MiB, e.g. 512")
    cpu_seconds: int = Field(
        3600, gt=0, description="CPU time limit per sidecar process in seconds, e.g. 3600"
    )
    max_processes: int = Field(
        64,
        gt=0,
        le=100_000,
        description="limit on processes and threads together (a gRPC sidecar uses ~15), e.g. 64",
    )
    max_open_files: int = Field(256, ge=16, le=1 << 20, description="open file limit, e.g. 256")
    max_file_size_mb: int = Field(
        64, gt=0, description="largest file the plugin may write, in MiB, e.g. 64"
    )
    data_quota_mb: int = Field(
        256, gt=0, le=1 << 20, description="most its data dir may hold, in MiB, e.g. 256"
    )
    trace_quota_mb: int = Field(
        16,
        gt=0,
        le=1 << 16,
        description="most the plugin's spans may take in the mesh's trace store, in MiB",
    )
    read_paths: list[str] = Field(
        default_factory=list,
        description="extra absolute host paths to see read-only, the same on every host "
        "(e.g. /etc/gitconfig); granted with plugins.<name>.sandbox.allow_paths. For paths "
        "that differ from host to host, use ${mount:NAME} and let the operator mount them",
    )
    write_paths: list[str] = Field(
        default_factory=list,
        description="extra absolute host paths the plugin may write (granted like read_paths)",
    )
    env: list[str] = Field(
        default_factory=list,
        description="names of environment variables the plugin needs, e.g. [API_KEY]",
    )

    @field_validator("read_paths", "write_paths")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for p in paths:
            if not p.startswith("/"):
                raise ValueError(f"{p!r} is not an absolute path; write it as /path/on/host")
        return paths

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.match(_ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return names


class Permissions(_Strict):
    """What the plugin may call through the mesh: glob patterns on qualified names."""

    tools: list[str] = Field(
        default_factory=list, description="tool patterns, e.g. ['tools-demo/*', 'mcp-time/*']"
    )
    agents: list[str] = Field(
        default_factory=list, description="agent patterns, e.g. ['*/summarizer']"
    )
    mcp: list[str] = Field(
        default_factory=list,
        description="MCP servers (plugin names) whose resources and prompts it may use, "
        "e.g. ['mcp-time']",
    )


class McpServerSpec(_Strict):
    """An existing MCP server, run inside the plugin's sandbox and bridged into the mesh."""

    command: Expandable = Field(
        min_length=1,
        description="the MCP server's command, e.g. mcp-server-time or node",
    )
    args: list[Expandable] = Field(
        default_factory=list,
        description="its arguments; ${SIDEMESH_DATA_DIR}, ${SIDEMESH_PLUGIN_DIR}, "
        "${SIDEMESH_PLUGIN} and ${mount:NAME} are expanded",
    )
    env: dict[str, Expandable] = Field(
        default_factory=dict,
        description="environment variables for the MCP server (values expand the variables "
        "that args do)",
    )
    transport: Literal["stdio", "streamable-http"] = Field(
        "stdio", description="stdio (the server is a child process) or streamable-http"
    )
    url: str | None = Field(
        None, description="for streamable-http: the server's URL, e.g. http://127.0.0.1:8000/mcp"
    )
    request_timeout: float = Field(
        30.0, gt=0, description="seconds an MCP request may take when the caller sets no deadline"
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.match(_ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return env

    @model_validator(mode="after")
    def _url_for_http(self) -> McpServerSpec:
        if self.transport == "streamable-http" and not self.url:
            raise ValueError("transport streamable-http needs 'url'")
        return self


class PluginManifest(_Strict):
    """A plugin's ``plugin.yaml``."""

    name: PluginName = Field(description="the plugin's name: lowercase letters, digits, '-'")
    version: str = Field(min_length=1, description="the plugin's version, e.g. 0.1.0")
    description: str = Field("", description="what the plugin does, in a sentence")
    author: str = Field("", description="who wrote it")
    runtime: Literal["python", "mcp", "remote"] | None = Field(
        None,
        description="'python' for a plugin written with plugins_sdk (then set 'app'); "
        "'mcp' for an existing MCP server (then set 'mcp'); 'remote' for a sidecar that "
        "runs elsewhere (then set 'address')",
    )
    address: str | None = Field(
        None,
        description="for runtime remote: the running sidecar, host:port or unix:/path",
    )
    app: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="for runtime python: the Plugin object as module:attribute, e.g. my_plugin:app",
    )
    entrypoint: list[Expandable] | None = Field(
        None,
        min_length=1,
        description="the command that starts the sidecar, e.g. ['./my-plugin', '--serve'] "
        "(expands the variables that mcp.args does)",
    )
    mcp: McpServerSpec | None = Field(
        None, description="for runtime mcp: the MCP server to run and bridge"
    )
    provides: Provides = Field(default_factory=Provides, description="what the plugin offers")
    config_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema of the operator's config for the plugin"
    )
    replicas: int = Field(1, ge=1, le=64, description="how many sidecars to run, 1 to 64")
    routing: Literal["round_robin", "least_loaded"] = Field(
        "round_robin", description="how calls pick a replica: round_robin or least_loaded"
    )
    startup_timeout: float = Field(
        30.0, gt=0, le=600, description="seconds a replica has to become ready, e.g. 30"
    )
    sandbox: SandboxNeeds = Field(
        default_factory=SandboxNeeds, description="what the plugin needs from the machine"
    )
    permissions: Permissions = Field(
        default_factory=Permissions, description="what the plugin may call through the mesh"
    )

    _directory: Path = PrivateAttr(default=Path("."))

    @property
    def directory(self) -> Path:
        """The directory the manifest was loaded from."""
        return self._directory

    @field_validator("config_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                path = "/".join(str(p) for p in exc.path)
                raise ValueError(
                    f"not a valid JSON Schema{' at ' + path if path else ''}: {exc.message}"
                ) from None
        return schema

    @model_validator(mode="after")
    def _one_way_to_start(self) -> PluginManifest:
        if self.entrypoint is None and self.runtime is None:
            raise ValueError(
                "say how to start the plugin: 'runtime: python' with 'app: module:attribute', "
                "or 'entrypoint: [command, args...]'"
            )
        if self.entrypoint is not None and self.runtime is not None:
            raise ValueError("give either 'entrypoint' or 'runtime'/'app', not both")
        if self.runtime == "python" and not self.app:
            raise ValueError("'runtime: python' needs 'app: module:attribute', e.g. my_plugin:app")
        if self.app and self.runtime != "python":
            raise ValueError("'app' needs 'runtime: python'")
        if self.runtime == "mcp" and self.mcp is None:
            raise ValueError("'runtime: mcp' needs 'mcp: {command: ..., args: [...]}'")
        if self.mcp is not None and self.runtime != "mcp":
            raise ValueError("'mcp' needs 'runtime: mcp'")
        if (self.runtime == "remote") != (self.address is not None):
            raise ValueError("'runtime: remote' and 'address: host:port' go together")
        if self.address is not None:
            normalize_address(self.address)  # raises ValueError with the fix
        return self

    @property
    def remote(self) -> bool:
        """The sidecar runs elsewhere: the mesh connects to it and does not launch it."""
        return self.runtime == "remote"

    def mount_references(self) -> list[tuple[str, str]]:
        """``(field, mount name)`` for every ``${mount:NAME}`` the manifest uses."""
        fields: list[tuple[str, str]] = []
        if self.mcp is not None:
            fields.append(("mcp.command", self.mcp.command))
            fields += [(f"mcp.args[{i}]", a) for i, a in enumerate(self.mcp.args)]
            fields += [(f"mcp.env.{k}", v) for k, v in self.mcp.env.items()]
        fields += [(f"entrypoint[{i}]", a) for i, a in enumerate(self.entrypoint or [])]
        return [(f, name) for f, text in fields for name in _variables.mounts_named(text)]

    def default_config(self) -> dict[str, Any]:
        """The top-level ``default`` values of the config schema's properties."""
        props = (self.config_schema or {}).get("properties", {})
        return {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}


def load_manifest(directory: Path) -> PluginManifest:
    """Loads ``directory/plugin.yaml``; raises :class:`~orchestrator.ConfigError`."""
    directory = directory.resolve()
    manifest = load_yaml_model(directory / MANIFEST_FILE, PluginManifest, "plugin manifest")
    manifest._directory = directory
    return manifest


def start_problem(manifest: PluginManifest) -> Problem | None:
    """Why the plugin could not start, as far as we can tell without starting it.

    ``sidemesh validate`` reports it; ``sidemesh serve`` refuses to start the plugin.
    """
    if manifest.app:
        module = manifest.app.split(":")[0]
        top = module.split(".")[0]
        local = manifest.directory / f"{top}.py", manifest.directory / top / "__init__.py"
        if not any(p.is_file() for p in local) and importlib.util.find_spec(top) is None:
            return Problem(
                "app",
                f"module {module!r} is neither in {manifest.directory} nor installed",
                f"add {top}.py to the plugin directory, or fix 'app'",
            )
    elif manifest.entrypoint:
        command = manifest.entrypoint[0]
        found = (manifest.directory / command).exists() if "/" in command else shutil.which(command)
        if not found:
            return Problem(
                "entrypoint",
                f"command {command!r} was not found",
                "use a path relative to the plugin directory (./my-plugin) or a command on PATH",
            )
    return None
