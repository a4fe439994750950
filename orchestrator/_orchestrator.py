"""The orchestrator: discovers plugins, supervises their sidecars, serves and routes the mesh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import Observation

from clients import AsyncMeshClient, SidemeshError, server_options
from orchestrator._catalog import Catalog
from orchestrator._config import MeshConfig
from orchestrator._discovery import DiscoveredPlugin, discover
from orchestrator._events import EventBus
from orchestrator._launch import (
    Launcher,
    ProcessLauncher,
    SandboxLauncher,
    ensure_private_dir,
    undeclared_env,
)
from orchestrator._manifest import MANIFEST_FILE, start_problem
from orchestrator._mesh_service import MeshService
from orchestrator._output import OutputLimits
from orchestrator._plugin import PluginPaths, PluginRuntime, duration, state_name
from orchestrator._replica import Replica
from orchestrator._router import Admission, Router
from orchestrator._routes import AGENT_SERVICE, MCP_SERVICE, TOOL_SERVICE
from orchestrator._supervisor import Supervisor
from orchestrator._telemetry import Telemetry
from orchestrator._yaml_models import ConfigError
from orchestrator.gateway import Authenticator, Authorizer
from orchestrator.gateway._http import McpHttpEndpoint
from sidecars.sandbox import LAYERS, remove_mesh_cgroups
from sidemesh.core import ENDPOINTS_FILE, process_alive, running_mesh
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("sidemesh.orchestrator")

MESH_SERVICE = "sidemesh.v1.MeshService"


class Orchestrator:
    """One mesh on one machine. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        launcher: Launcher | None = None,
        mcp_authenticator: Authenticator | None = None,
        mcp_authorizer: Authorizer | None = None,
    ) -> None:
        self.config = config
        self.catalog = Catalog()
        self.catalog.not_serving = self._not_serving
        self.events = EventBus()
        self.plugins: dict[str, PluginRuntime] = {}
        if launcher is None:
            off = config.sandbox.mode == "off"
            launcher = ProcessLauncher() if off else SandboxLauncher(config.sandbox)
        self._launcher = launcher
        self.telemetry = Telemetry(config.telemetry, config.state_dir)
        self.telemetry.on_violation = self._trace_violation
        self.supervisor = Supervisor(
            config.supervisor,
            self.catalog,
            self.events,
            self._launcher,
            config.log_level,
            self.telemetry.sidecar_environment(),
            OutputLimits(
                config.limits.plugin_log_lines_per_second,
                config.limits.plugin_log_burst,
                config.limits.plugin_log_line_bytes,
            ),
        )
        self._admission = Admission(config.limits.max_concurrent_calls)
        self._server: grpc.aio.Server | None = None
        self._callback_servers: list[grpc.aio.Server] = []
        self._health = health.aio.HealthServicer()
        self._run_dir: Path | None = None
        #: The addresses actually bound (TCP port 0 replaced by the real port).
        self.addresses: list[str] = []
        #: The streamable-HTTP MCP endpoint (``mcp.http``), its hooks, and its mesh client.
        self.mcp_http: McpHttpEndpoint | None = None
        self._mcp_hooks = (mcp_authenticator, mcp_authorizer)
        self._mcp_client: AsyncMeshClient | None = None

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        """Binds the listeners, then starts every plugin (without waiting for them)."""
        config = self.config
        ensure_private_dir(config.state_dir)
        self._run_dir = _make_run_dir(config.runtime_dir)
        for found in discover(config):
            self._add_plugin(found)
        for name in sorted(set(config.plugins) - set(self.plugins)):
            log.warning(
                "the config has settings for plugin %r, but no plugin of that name was found "
                "in plugin_dirs %s",
                name,
                [str(d) for d in config.plugin_dirs],
            )
        self._server = self._new_server(caller=None)
        for address in config.listen_addresses():
            self.addresses.append(_bind(self._server, address))
        await self._server.start()
        if isinstance(self._launcher, SandboxLauncher):
            self._launcher.mesh_ports = tuple(
                int(a.rpartition(":")[2]) for a in self.addresses if not a.startswith("unix:")
            )
        for plugin in self.plugins.values():
            if plugin.manifest is not None and plugin.manifest.remote and plugin.replicas:
                self.supervisor.start(plugin)
            elif plugin.paths is not None:
                server = self._new_server(caller=plugin)
                _bind(server, f"unix:{plugin.paths.mesh_socket}")
                await server.start()
                self._callback_servers.append(server)
                self.supervisor.start(plugin)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        if config.mcp.http.enabled:
            await self._start_mcp_http()
        self._observe()
        self._write_endpoints()
        log.info("serving on %s", ", ".join(self.addresses))

    async def _start_mcp_http(self) -> None:
        """The MCP endpoint calls the mesh as a client of its own first listener."""
        address = next((a for a in self.addresses if a.startswith("unix:")), self.addresses[0])
        self._mcp_client = AsyncMeshClient(address)
        authenticator, authorizer = self._mcp_hooks
        self.mcp_http = McpHttpEndpoint(
            self.config.mcp, self._mcp_client, authenticator=authenticator, authorizer=authorizer
        )
        await self.mcp_http.start()

    def _add_plugin(self, found: DiscoveredPlugin) -> None:
        manifest = found.manifest
        name = found.name
        override = self.config.override(name)
        paths = None
        if manifest is not None and override.enabled and not manifest.remote:
            assert self._run_dir is not None
            index = len(self.plugins)
            paths = PluginPaths(
                ensure_private_dir(self._run_dir / f"p{index}"),
                ensure_private_dir(self.config.state_dir / "data" / name),
            )
        plugin = PluginRuntime(
            name, manifest, override, self.config, paths, str(found.directory), len(self.plugins)
        )
        if found.error is not None:
            plugin.error = str(found.error)
            log.error("plugin in %s cannot be loaded:\n%s", found.directory, found.error)
        elif manifest is not None and override.enabled:
            try:
                problem = start_problem(manifest)
                if problem is not None:
                    raise ValueError(str(ConfigError(manifest.directory / MANIFEST_FILE,
                                                     "plugin manifest", [problem])))  # fmt: skip
                plugin.config = plugin.effective_config()
                refusal = (
                    self._remote_layers(plugin)
                    if manifest.remote
                    else self._launcher.prepare(plugin)
                )
                if refusal:
                    raise ValueError(refusal)
            except ValueError as exc:
                plugin.error = str(exc)
                plugin.paths = None  # not started
                plugin.replicas = []
                log.error("plugin %s: %s", name, exc)
            missing, extra = undeclared_env(manifest, override)
            if missing:
                log.warning(
                    "plugin %s declares env %s but the config gives no value", name, missing
                )
            if extra:
                log.warning(
                    "plugin %s: plugins.%s.env sets %s, which its manifest does not declare in "
                    "sandbox.env; they are not passed on",
                    name,
                    name,
                    extra,
                )
        if manifest is not None:
            self.catalog.declare(name, manifest.provides.agents, manifest.provides.tools)
        self._watch_outliers(plugin)
        self.plugins[name] = plugin
        self.supervisor.add(plugin)

    def _not_serving(self, name: str) -> SidemeshError | None:
        """The error for a call to plugin ``name`` when it has no ready replica."""
        plugin = self.plugins.get(name)
        return plugin.unavailable() if plugin is not None and not plugin.ready else None

    def _watch_outliers(self, plugin: PluginRuntime) -> None:
        """Ejections and returns to rotation become events."""

        def ejected(replica: Replica, seconds: float, reason: str) -> None:
            self.events.emit(
                plugin.name,
                "replica_ejected",
                mesh_pb2.ReplicaEjected(
                    replica=replica.index, reason=reason, duration=duration(seconds),
                    ejections=replica.ejections,
                ),
            )  # fmt: skip

        def restored(replica: Replica) -> None:
            self.events.emit(
                plugin.name, "replica_restored", mesh_pb2.ReplicaRestored(replica=replica.index)
            )

        plugin.resilience.on_ejected = ejected
        plugin.resilience.on_restored = restored

    def _trace_violation(self, plugin: str, replica: int, detail: str) -> None:
        """A plugin's spans were refused (reported at a bounded rate): an event."""
        self.events.emit(
            plugin, "sandbox_violation", mesh_pb2.SandboxViolation(replica=replica, detail=detail)
        )

    @staticmethod
    def _remote_layers(plugin: PluginRuntime) -> str:
        off = "off: a remote plugin runs outside this mesh's sandbox"
        plugin.sandbox_layers = [
            mesh_pb2.SandboxLayer(name=n, active=False, detail=off) for n in LAYERS
        ]
        return ""

    def _new_server(self, caller: PluginRuntime | None) -> grpc.aio.Server:
        limit = self.config.limits.max_message_bytes
        # so_reuseport 0: refuse a port another process holds, rather than silently share it.
        server = grpc.aio.server(options=[*server_options(limit), ("grpc.so_reuseport", 0)])
        Router(
            self.catalog, self.plugins, self.events, self._admission, self.telemetry, caller=caller
        ).register(server)
        mesh_pb2_grpc.add_MeshServiceServicer_to_server(
            MeshService(
                self.catalog,
                self.plugins,
                self.events,
                self.telemetry.store,
                caller=caller,
                trace_usage=self.telemetry.trace_usage,
            ),
            server,
        )
        if caller is None or caller.manifest is None:
            receiver = self.telemetry.receiver()
        else:  # the plugin's spans: stamped as its own, within its quota
            quota = caller.override.sandbox.trace_quota_mb or caller.manifest.sandbox.trace_quota_mb
            receiver = self.telemetry.receiver(
                caller.name, quota_mb=quota, replicas=len(caller.replicas)
            )
        receiver.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if caller is None:
            reflection.enable_server_reflection(
                (
                    AGENT_SERVICE,
                    TOOL_SERVICE,
                    MCP_SERVICE,
                    MESH_SERVICE,
                    "opentelemetry.proto.collector.trace.v1.TraceService",
                    health.SERVICE_NAME,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        return server

    def _observe(self) -> None:
        """Metrics read from the orchestrator's state at each export (no hot-path cost)."""
        tel = self.telemetry
        tel.observe(
            "sidemesh.calls.in_flight", "Calls being routed", "{call}",
            lambda: [Observation(self._admission.in_flight)],
        )  # fmt: skip
        tel.observe(
            "sidemesh.plugin.replicas.ready", "Ready replicas per plugin", "{replica}",
            lambda: [Observation(len(p.ready), {"sidemesh.plugin": n})
                     for n, p in self.plugins.items()],
        )  # fmt: skip
        tel.observe(
            "sidemesh.sidecar.restarts", "Sidecar restarts per plugin since start", "{restart}",
            lambda: [Observation(sum(r.restarts for r in p.replicas), {"sidemesh.plugin": n})
                     for n, p in self.plugins.items()],
        )  # fmt: skip
        tel.observe(
            "sidemesh.plugin.state", "1 for each plugin's current state", "1",
            lambda: [Observation(1, {"sidemesh.plugin": n, "sidemesh.state": s})
                     for n, s in self.plugin_states().items()],
        )  # fmt: skip

    def _write_endpoints(self) -> None:
        path = self.config.state_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".tmp")
        written: dict[str, Any] = {"pid": os.getpid(), "addresses": self.addresses}
        if self.mcp_http is not None:
            written["mcp"] = self.mcp_http.urls
        tmp.write_text(json.dumps(written))
        tmp.replace(path)

    async def wait_ready(self, timeout: float) -> bool:
        """Waits for the plugins to leave STARTING; True when every enabled one is READY."""
        return await self.supervisor.wait_ready(timeout)

    def plugin_states(self) -> dict[str, str]:
        """Plugin name -> state name, for logs and the demo."""
        return {n: state_name(p.state) for n, p in self.plugins.items()}

    # -- stop ----------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets calls in flight finish within ``grace``, stops sidecars."""
        grace = self.config.supervisor.shutdown_grace if grace is None else grace
        log.info("shutting down: draining calls in flight (grace %.1fs)", grace)
        await self._health.enter_graceful_shutdown()
        if self.mcp_http is not None:
            await self.mcp_http.stop()
        if self._mcp_client is not None:
            await self._mcp_client.close()
        self.events.close()  # event streams never end by themselves: end them now
        if self._server is not None:
            await self._drain(self._server, grace)
        # The callback sockets stay open while sidecars drain: calls still finishing
        # make callbacks, and sidecars send their last spans there as they exit.
        await self.supervisor.stop(grace)
        await asyncio.gather(*(s.stop(1.0) for s in self._callback_servers))
        remove_mesh_cgroups()
        self._launcher.close()
        await asyncio.to_thread(self.telemetry.shutdown)
        with contextlib.suppress(FileNotFoundError):
            (self.config.state_dir / ENDPOINTS_FILE).unlink()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        for address in self.addresses:
            if address.startswith("unix:"):
                _remove(Path(address[len("unix:") :]))
        log.info("stopped")

    async def _drain(self, server: grpc.aio.Server, grace: float) -> None:
        """Stops accepting calls; after ``grace`` seconds, ends the rest saying why.

        gRPC's own stop would cancel them as "Cancelling all calls"; instead
        each call still running is told the mesh is shutting down (UNAVAILABLE).
        """
        stopped = asyncio.create_task(server.stop(grace + 2.0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._admission.in_flight and loop.time() < deadline and not stopped.done():
            await asyncio.sleep(0.05)
        if self._admission.in_flight:
            log.warning(
                "ending %d calls still in flight after the grace period", self._admission.in_flight
            )
            self._admission.closing = True
            for plugin in self.plugins.values():
                for replica in plugin.replicas:
                    for call in list(replica.calls):
                        call.cancel()
        await stopped


def _bind(server: grpc.aio.Server, address: str) -> str:
    """Binds ``address``; returns it with the real port. Raises ``OSError`` with the fix."""
    if address.startswith("unix:"):
        path = Path(address[len("unix:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if _someone_listens(path):
                raise OSError(f"another process is already serving on {address}")
            path.unlink()  # a stale socket from a mesh that died
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}; is another mesh running?") from None
    if not address.startswith("unix:"):
        host = address.rpartition(":")[0]
        address = f"{host}:{port}"
    return address


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _someone_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def _make_run_dir(runtime_dir: Path) -> Path:
    """A fresh directory for this mesh's sockets; removes those of meshes that died."""
    ensure_private_dir(runtime_dir)
    for old in runtime_dir.glob("m*"):
        pid = old.name[1:]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    run_dir = runtime_dir / f"m{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return ensure_private_dir(run_dir)


def endpoints(state_dir: Path) -> dict[str, Any] | None:
    """What a running mesh wrote to ``state_dir``: its pid and addresses."""
    return running_mesh(state_dir)
