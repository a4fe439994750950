"""The orchestrator's configuration, ``sidemesh.yaml``. Every field has a working default."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator import _variables
from orchestrator._auth_config import AuthConfig, PluginGrant, PolicyConfig
from orchestrator._mcp_config import McpGatewaySettings
from orchestrator._mount_config import Mount
from orchestrator._yaml_models import load_yaml_model, validate_model
from sidemesh.core import DEFAULT_TCP_ADDRESS, default_state_dir, normalize_address

#: The example plugins that ship with Sidemesh (used when no plugin_dirs are configured).
BUNDLED_PLUGINS_DIR = Path(__file__).resolve().parent.parent / "examples" / "plugins"


def default_runtime_dir() -> Path:
    """A short path for Unix sockets: ``$XDG_RUNTIME_DIR/sidemesh``, else ``/tmp/sidemesh-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "sidemesh" if base else Path(f"/tmp/sidemesh-{os.getuid()}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SandboxGrant(_Strict):
    """What the operator grants, tightens or relaxes of one plugin's sandbox."""

    enabled: bool = Field(True, description="false runs this plugin without a sandbox")
    allow_network: bool = Field(
        False, description="grant the network access the manifest asks for (sandbox.network)"
    )
    allow_paths: bool = Field(
        False, description="grant the manifest's sandbox.read_paths and sandbox.write_paths"
    )
    mounts: dict[str, Mount] = Field(
        default_factory=dict,
        description="host paths the plugin sees, by name (the manifest's ${mount:NAME}): "
        "{source: /host/path, target: /mnt/x, mode: ro|rw, chown: false}",
    )
    memory_mb: int | None = Field(
        None, gt=0, description="memory limit in MiB (replaces the manifest's)"
    )
    cpu_seconds: int | None = Field(None, gt=0, description="CPU time limit per process in seconds")
    max_processes: int | None = Field(None, gt=0, description="process/thread limit")
    max_open_files: int | None = Field(None, ge=16, description="open file limit")
    max_file_size_mb: int | None = Field(None, gt=0, description="largest file in MiB")
    data_quota_mb: int | None = Field(
        None, gt=0, description="most the plugin's data dir may hold, in MiB"
    )
    trace_quota_mb: int | None = Field(
        None,
        gt=0,
        description="most the plugin's spans may take in the trace store, in MiB",
    )
    allow_mesh_listeners: bool = Field(
        False,
        description="with network granted, also let the plugin connect to the mesh's own "
        "TCP listeners (refused by default: a plugin calls the mesh on its callback socket)",
    )

    @field_validator("mounts")
    @classmethod
    def _mount_names(cls, mounts: dict[str, Mount]) -> dict[str, Mount]:
        targets: dict[str, str] = {}
        for name, mount in mounts.items():
            if not re.fullmatch(_variables.MOUNT_NAME, name):
                raise ValueError(
                    f"{name!r} is not a mount name: lowercase letters, digits, '-' and '_'"
                )
            other = targets.setdefault(mount.sandbox_path, name)
            if other != name:
                raise ValueError(
                    f"mounts {other!r} and {name!r} are both at {mount.sandbox_path}: give one "
                    "another 'target'"
                )
        return mounts


class RetryPolicy(_Strict):
    """When and how the mesh retries a call that failed on its way to a replica.

    A call is retried only when that is safe: the tool is declared idempotent
    or read-only (or the MCP request only reads), or the attempt provably never
    reached a sidecar. Only before any response message reached the caller, on
    another replica, within the caller's deadline, and within the retry budget.
    """

    max_attempts: int = Field(
        3, ge=1, le=10, description="attempts per call, the first included; 1 turns retries off"
    )
    backoff_initial: float = Field(
        0.025, gt=0, le=10, description="seconds of the first retry's backoff (with full jitter)"
    )
    backoff_max: float = Field(0.25, gt=0, le=60, description="longest backoff in seconds")
    budget_percent: float = Field(
        20.0,
        ge=0,
        le=100,
        description="retries may add at most this percentage to a plugin's calls, so that "
        "retries cannot multiply an outage",
    )
    budget_min_per_second: float = Field(
        10.0, ge=0, description="retries a plugin may always make per second, whatever its load"
    )
    per_try_timeout: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="seconds an attempt of a unary call may wait for its first response "
        "before it counts as a failure of its replica (and is retried when safe); "
        "none by default",
    )


class OutlierDetection(_Strict):
    """Takes a replica that keeps failing out of rotation for a growing interval."""

    consecutive_failures: int = Field(
        5,
        ge=1,
        description="transport failures or per-try timeouts in a row that eject a replica",
    )
    base_ejection: float = Field(
        2.0, gt=0, le=3600, description="seconds of the first ejection; doubles with each next"
    )
    max_ejection: float = Field(60.0, gt=0, le=86400, description="longest ejection in seconds")
    max_ejected_percent: int = Field(
        50,
        ge=0,
        le=100,
        description="most replicas of a plugin ejected at once, in percent (one may always "
        "be, but never the last one taking calls)",
    )


class PluginOverride(_Strict):
    """The operator's settings for one plugin, under ``plugins.<name>``."""

    enabled: bool = Field(True, description="false keeps the plugin from starting")
    config: dict[str, Any] = Field(
        default_factory=dict, description="values for the plugin's config schema"
    )
    replicas: int | None = Field(None, ge=1, le=64, description="replica count, 1 to 64")
    routing: Literal["round_robin", "least_loaded"] | None = Field(
        None, description="round_robin or least_loaded"
    )
    startup_timeout: float | None = Field(
        None, gt=0, le=600, description="seconds a replica has to become ready"
    )
    env: dict[str, _variables.Expandable] = Field(
        default_factory=dict,
        description="values for environment variables the manifest declares in sandbox.env "
        "(${SIDEMESH_DATA_DIR}, ${SIDEMESH_PLUGIN_DIR}, ${SIDEMESH_PLUGIN} and ${mount:NAME} "
        "are expanded)",
    )
    sandbox: SandboxGrant = Field(
        default_factory=SandboxGrant, description="what the plugin's sandbox grants or limits"
    )
    permissions: PluginGrant | None = Field(
        None,
        description="what the operator lets the plugin call: its manifest's permissions "
        "narrowed to these (agents, tools, mcp, mesh: [read, admin]); default: the manifest's, "
        "and no mesh API on its callback socket",
    )
    retries: RetryPolicy | None = Field(
        None, description="this plugin's retry policy (default: the mesh's 'retries')"
    )
    outlier_detection: OutlierDetection | None = Field(
        None,
        description="this plugin's outlier ejection (default: the mesh's 'outlier_detection')",
    )

    @model_validator(mode="after")
    def _env_mounts(self) -> PluginOverride:
        for name, value in self.env.items():
            for mount in _variables.mounts_named(value):
                if mount not in self.sandbox.mounts:
                    raise ValueError(
                        f"env.{name} uses ${{mount:{mount}}}, which is not one of this plugin's "
                        f"mounts ({', '.join(self.sandbox.mounts) or 'none'}): add it under "
                        f"sandbox.mounts.{mount}"
                    )
        return self


class CallLimits(_Strict):
    """Limits that protect the mesh from its clients and plugins."""

    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest gRPC message in bytes, e.g. 16777216"
    )
    max_concurrent_calls: int = Field(
        10_000, ge=1, description="calls in flight at once before RESOURCE_EXHAUSTED"
    )
    plugin_log_lines_per_second: float = Field(
        200.0,
        gt=0,
        description="lines of a replica's output logged per second; more are dropped and counted",
    )
    plugin_log_burst: int = Field(
        1000, ge=1, description="lines a replica may log at once before the rate applies"
    )
    plugin_log_line_bytes: int = Field(
        4096,
        ge=80,
        le=1 << 20,
        description="longest line of plugin output logged; longer ones are cut and marked",
    )


class SupervisorSettings(_Strict):
    """How the orchestrator watches over and restarts sidecars."""

    health_interval: float = Field(5.0, gt=0, description="seconds between health checks")
    health_timeout: float = Field(2.0, gt=0, description="seconds a health check may take")
    health_failures: int = Field(
        3, ge=1, description="failed checks in a row before a replica is replaced"
    )
    backoff_initial: float = Field(0.5, gt=0, description="first restart delay in seconds")
    backoff_max: float = Field(30.0, gt=0, description="longest restart delay in seconds")
    crash_loop_after: int = Field(
        3, ge=1, description="quick crashes in a row that make a crash loop"
    )
    min_uptime: float = Field(
        10.0, gt=0, description="seconds a replica must live for a crash not to count as quick"
    )
    shutdown_grace: float = Field(
        10.0, ge=0, description="seconds calls in flight get to finish on shutdown"
    )


class SandboxSettings(_Strict):
    """How sidecars are sandboxed on this host."""

    mode: Literal["enforce", "strict", "off"] = Field(
        "enforce",
        description="enforce: every layer the host supports (missing ones reported); "
        "strict: refuse plugins when a layer is missing; off: no sandbox",
    )
    uid_base: int = Field(
        3_100_000,
        ge=1000,
        description="as root, each plugin runs as its own host uid in uid_base.."
        "uid_base+65535, derived from its name and remembered in <state_dir>/uids.json, so "
        "it is the same every run (uids of existing accounts and of other live meshes are "
        "skipped); the default is far from login, system, systemd DynamicUser and "
        "/etc/subuid ranges",
    )
    bwrap: str = Field("bwrap", description="the bubblewrap command")

    @field_validator("mode", mode="before")
    @classmethod
    def _bare_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `off` as false: `sandbox: {mode: off}` must work.
        return "off" if value is False else value


class RemotePlugin(_Strict):
    """A sidecar the mesh routes to but does not launch (another host, a benchmark)."""

    address: str = Field(description="where it serves: host:port or unix:/path")

    @field_validator("address")
    @classmethod
    def _address(cls, address: str) -> str:
        return normalize_address(address)


class TelemetrySettings(_Strict):
    """Tracing and metrics: the embedded trace store and OTLP export."""

    enabled: bool = Field(True, description="false turns tracing and metrics off")
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC endpoint for traces and metrics, e.g. http://127.0.0.1:4317 "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT; none: traces stay in the embedded store)",
    )
    max_traces: int = Field(1000, ge=1, description="traces the embedded store keeps, e.g. 1000")
    max_store_mb: int = Field(
        256,
        ge=1,
        le=1 << 20,
        description="most the embedded trace store may hold, in MiB; the oldest traces are "
        "evicted beyond it, e.g. 256",
    )
    client_quota_mb: int = Field(
        16,
        ge=1,
        le=1 << 16,
        description="most the spans clients send to the mesh's listeners may take in the "
        "trace store, in MiB (a plugin's quota is its sandbox.trace_quota_mb)",
    )
    metrics_interval: float = Field(10.0, gt=0, description="seconds between metric exports")
    export_delay_ms: int = Field(
        200, ge=1, description="how long finished spans wait to be batched, in milliseconds"
    )


class InterceptorSpec(_Strict):
    """One entry of ``interceptors:``: an operator's hook on every routed call."""

    use: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="the Interceptor class (or factory) as module:attribute, e.g. audit:Audit",
    )
    path: Path | None = Field(
        None, description="a directory to import the module from (relative to the config file)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments the class is called with"
    )

    @field_validator("path")
    @classmethod
    def _relative_to_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base = (info.context or {}).get("base_dir")
        return value if value is None or base is None else Path(base, value).resolve()


class MeshConfig(_Strict):
    """``sidemesh.yaml``. Relative paths are relative to the file's directory."""

    listen: list[str] | None = Field(
        None,
        description="addresses to serve on: host:port and/or unix:/path "
        f"(default: unix:<runtime_dir>/sidemesh.sock and {DEFAULT_TCP_ADDRESS})",
    )
    plugin_dirs: list[Path] = Field(
        default_factory=lambda: [BUNDLED_PLUGINS_DIR],
        description="directories holding plugin directories (each with a plugin.yaml)",
    )
    entry_points: bool = Field(
        True, description="also load plugins registered under the 'sidemesh.plugins' entry point"
    )
    plugins: dict[str, PluginOverride] = Field(
        default_factory=dict, description="per-plugin settings, keyed by plugin name"
    )
    remote_plugins: dict[str, RemotePlugin] = Field(
        default_factory=dict,
        description="sidecars already running elsewhere, keyed by plugin name; the mesh "
        "routes to them without launching them",
    )
    limits: CallLimits = Field(
        default_factory=CallLimits, description="message size and call limits"
    )
    retries: RetryPolicy = Field(
        default_factory=RetryPolicy, description="retries of failed calls, for every plugin"
    )
    outlier_detection: OutlierDetection = Field(
        default_factory=OutlierDetection,
        description="ejection of replicas that keep failing, for every plugin",
    )
    supervisor: SupervisorSettings = Field(
        default_factory=SupervisorSettings, description="health checks, restarts, shutdown"
    )
    sandbox: SandboxSettings = Field(
        default_factory=SandboxSettings, description="the sidecar sandbox"
    )
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings, description="tracing, metrics, OTLP export"
    )
    mcp: McpGatewaySettings = Field(
        default_factory=McpGatewaySettings,
        description="the mesh as an MCP gateway: HTTP endpoint, authorization, virtual servers",
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig,
        description="how callers prove who they are: Unix peer credentials, TLS and mTLS, "
        "bearer tokens and JWTs (docs/auth.md)",
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig,
        description="who may call what, and how fast: rules, groups, limits (docs/auth.md)",
    )
    interceptors: list[InterceptorSpec] = Field(
        default_factory=list,
        description="hooks on every routed call, outermost first (docs/architecture.md)",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="where the mesh keeps its state (endpoints, traces)",
    )
    runtime_dir: Path = Field(
        default_factory=default_runtime_dir,
        description="short path for the mesh's Unix sockets, e.g. /run/sidemesh",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR"
    )

    @field_validator("listen")
    @classmethod
    def _addresses(cls, addresses: list[str] | None) -> list[str] | None:
        if addresses is None:
            return None
        if not addresses:
            raise ValueError("give at least one address, e.g. ['127.0.0.1:50051']")
        return [normalize_address(a) for a in addresses]

    @field_validator("plugin_dirs", "state_dir", "runtime_dir")
    @classmethod
    def _relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        base = (info.context or {}).get("base_dir")
        if base is None:
            return value
        if isinstance(value, list):
            return [Path(base, p).resolve() for p in value]
        return Path(base, value).resolve()

    @model_validator(mode="after")
    def _mounts_outside_the_mesh(self) -> MeshConfig:
        own = [self.state_dir.resolve(), self.runtime_dir.resolve()]
        for plugin, override in self.plugins.items():
            for name, mount in override.sandbox.mounts.items():
                for path in own:
                    if mount.source.is_relative_to(path) or path.is_relative_to(mount.source):
                        raise ValueError(
                            f"plugins.{plugin}.sandbox.mounts.{name}: {mount.source} holds or "
                            f"is inside the mesh's own {path} (its state, tokens and sockets): "
                            "mount another path"
                        )
        return self

    def listen_addresses(self) -> list[str]:
        """The configured addresses, or the defaults."""
        if self.listen is not None:
            return list(self.listen)
        return [f"unix:{self.runtime_dir / 'sidemesh.sock'}", DEFAULT_TCP_ADDRESS]

    def override(self, plugin: str) -> PluginOverride:
        """The operator's settings for ``plugin`` (defaults when it has none)."""
        return self.plugins.get(plugin) or PluginOverride()


def load_config(path: Path | None) -> MeshConfig:
    """Loads ``path``, or the defaults when ``path`` is None; raises ``ConfigError``."""
    if path is None:
        return validate_model({}, MeshConfig, "<defaults>", "Sidemesh config")
    path = path.resolve()
    return load_yaml_model(path, MeshConfig, "Sidemesh config", context={"base_dir": path.parent})
