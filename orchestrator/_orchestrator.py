"""The orchestrator: discovers plugins, supervises their sidecars, serves and routes the mesh.

The control plane is Python (discovery, supervision, the catalog, decisions,
the mesh's own API); the data plane is native (``sidemesh_dataplane``): it owns
every listener, forwards routed calls as bytes and asks :class:`Decider` where
each goes. What the orchestrator answers itself (``MeshService``, health,
reflection, ``ToolService.ListTools``, the sidecars' OTLP export) the data plane
passes to a grpc.aio server on a private Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import sidemesh_dataplane as dp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import Observation

from clients import AsyncMeshClient
from orchestrator._access import Access
from orchestrator._accounting import Accounting
from orchestrator._auth_config import listener_problems
from orchestrator._authz import PluginAccess
from orchestrator._catalog import Catalog
from orchestrator._config import MeshConfig
from orchestrator._discovery import DiscoveredPlugin, discover
from orchestrator._events import EventBus
from orchestrator._interceptors import load_interceptors
from orchestrator._launch import (
    Launcher,
    ProcessLauncher,
    SandboxLauncher,
    ensure_private_dir,
    undeclared_env,
)
from orchestrator._manifest import MANIFEST_FILE, start_problem
from orchestrator._mesh_service import MeshService, tool_listing
from orchestrator._output import OutputLimits
from orchestrator._own_access import OwnAccess
from orchestrator._plugin import PluginPaths, PluginRuntime, duration, state_name
from orchestrator._replica import Replica
from orchestrator._routes import AGENT_SERVICE, MCP_SERVICE, TOOL_SERVICE
from orchestrator._routing import (
    COMPLETE_AFTER,
    DATAPLANE_ROUTES,
    Decider,
    Upstreams,
    admission_refusal,
)
from orchestrator._supervisor import Supervisor
from orchestrator._telemetry import Telemetry
from orchestrator._yaml_models import ConfigError
from orchestrator.gateway import Authenticator, Authorizer, McpHttpEndpoint
from orchestrator.sandbox import LAYERS, remove_mesh_cgroups
from sidemesh.core import ENDPOINTS_FILE, SidemeshError, process_alive, server_options
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("sidemesh.orchestrator")

MESH_SERVICE = "sidemesh.v1.MeshService"
OTLP_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
#: What a plugin's callback socket serves (the mesh API only as far as it is granted).
CALLBACK_SERVICES = (AGENT_SERVICE, TOOL_SERVICE, MCP_SERVICE, MESH_SERVICE, OTLP_SERVICE,
                     health.SERVICE_NAME)  # fmt: skip


class Orchestrator:
    """One mesh on one machine. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        launcher: Launcher | None = None,
        mcp_authenticator: Authenticator | None = None,
        mcp_authorizer: Authorizer | None = None,
        source: str = "sidemesh.yaml",
    ) -> None:
        """``source``: the config file, named in refusals that say which rule to add."""
        self.config = config
        self._source = source
        #: Who may call what (made at start: it writes the owner's token to the state dir).
        self.access: Access | None = None
        self.catalog = Catalog()
        self.catalog.not_serving = self._not_serving
        self.events = EventBus()
        self.plugins: dict[str, PluginRuntime] = {}
        if launcher is None:
            off = config.sandbox.mode == "off"
            launcher = (
                ProcessLauncher() if off else SandboxLauncher(config.sandbox, config.state_dir)
            )
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
        self._decider = Decider(self.catalog, self.plugins, routed=self.telemetry.routed)
        self._decider.interceptors = load_interceptors(config.interceptors, source)
        self._plane: dp.DataPlane | None = None
        self._upstreams: Upstreams | None = None
        self._accounting: Accounting | None = None
        self._internal: grpc.aio.Server | None = None
        self._client_listeners: list[str] = []
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
        self.access = Access(config.auth, config.policy, {}, config.state_dir, source=self._source)
        self._decider.access = self.access
        for problem in listener_problems(config.auth, config.listen_addresses()):
            log.warning("auth: %s", problem)
        plane = self._plane = await self._start_planes(self._run_dir)
        self._upstreams = Upstreams(plane, self._decider)
        for found in discover(config):
            self._add_plugin(found)
        for name in sorted(set(config.plugins) - set(self.plugins)):
            log.warning(
                "the config has settings for plugin %r, but no plugin of that name was found "
                "in plugin_dirs %s",
                name,
                [str(d) for d in config.plugin_dirs],
            )
        for i, address in enumerate(config.listen_addresses()):
            self._client_listeners.append(f"client{i}")
            self.addresses.append(self._listen_client(plane, address, f"client{i}"))
        if isinstance(self._launcher, SandboxLauncher):
            self._launcher.mesh_ports = tuple(
                int(a.rpartition(":")[2]) for a in self.addresses if not a.startswith("unix:")
            )
        for plugin in self.plugins.values():
            if plugin.manifest is not None and plugin.manifest.remote and plugin.replicas:
                self.supervisor.start(plugin)
            elif plugin.paths is not None:
                if plugin.manifest is not None:  # its spans: stamped as its own, within its quota
                    self.telemetry.add_plugin(
                        plugin.name,
                        quota_mb=plugin.override.sandbox.trace_quota_mb
                        or plugin.manifest.sandbox.trace_quota_mb,
                        replicas=len(plugin.replicas),
                    )
                _listen(
                    plane, f"unix:{plugin.paths.mesh_socket}", listener_id=f"plugin:{plugin.name}",
                    caller=plugin.name, services=CALLBACK_SERVICES,
                )  # fmt: skip
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
                self.config.state_dir / "images" / f"{name}.ext4",
            )
        plugin = PluginRuntime(
            name, manifest, override, self.config, paths, str(found.directory), len(self.plugins)
        )
        for replica in plugin.replicas:
            replica.upstreams = self._upstreams
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
        if manifest is not None and self.access is not None:
            self.access.policy.set_plugin(
                name, PluginAccess(manifest.permissions, override.permissions)
            )
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

    def _listen_client(self, plane: dp.DataPlane, address: str, listener_id: str) -> str:
        """A client listener: the Unix socket owner-only (or as ``auth.unix`` admits), TCP
        with TLS when ``auth.tls`` is set; how its peers are identified goes to the decider."""
        auth = self.config.auth
        if address.startswith("unix:"):
            self._decider.listeners[listener_id] = "unix"
            return _listen(
                plane, address, listener_id=listener_id, unix_mode=auth.unix.socket_mode()
            )
        tls = None
        if auth.tls is not None:
            tls = dp.TlsConfig(
                str(auth.tls.cert), str(auth.tls.key),
                client_ca=str(auth.tls.client_ca) if auth.tls.client_ca else None,
                require_client_cert=auth.tls.require_client_cert,
            )  # fmt: skip
        self._decider.listeners[listener_id] = "tls" if tls is not None else "tcp"
        return _listen(plane, address, listener_id=listener_id, tls=tls)

    async def _start_planes(self, run_dir: Path) -> dp.DataPlane:
        """The orchestrator's own services on a private socket, and the data plane before them."""
        config, telemetry = self.config, self.telemetry
        limit = config.limits.max_message_bytes
        own = OwnAccess(self.access, self._decider.listeners)
        internal = grpc.aio.server(options=server_options(limit), interceptors=[own])
        mesh_pb2_grpc.add_MeshServiceServicer_to_server(
            MeshService(
                self.catalog,
                self.plugins,
                self.events,
                telemetry.store,
                trace_usage=telemetry.trace_usage,
                own=own,
            ),
            internal,
        )
        # Spans sent on a callback socket are the plugin's (``sidemesh-caller``), others clients'.
        telemetry.receiver().register(internal)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, internal)
        internal.add_generic_rpc_handlers((tool_listing(self.catalog, self.plugins, own),))
        reflection.enable_server_reflection(
            (AGENT_SERVICE, TOOL_SERVICE, MCP_SERVICE, MESH_SERVICE, OTLP_SERVICE,
             health.SERVICE_NAME, reflection.SERVICE_NAME),
            internal,
        )  # fmt: skip
        address = f"unix:{run_dir / 'internal.sock'}"  # run_dir is the orchestrator's alone
        internal.add_insecure_port(address)
        await internal.start()
        self._internal = internal
        decider = self._decider
        plane = dp.DataPlane(
            decider.decide,
            upstream_failed=decider.upstream_failed,
            retry_pick=decider.retry_pick,
            verify_peer=decider.verify_peer,
            routes=DATAPLANE_ROUTES,
            complete_after=COMPLETE_AFTER,
            max_message_bytes=limit,
            max_concurrent_calls=config.limits.max_concurrent_calls,
            internal_address=address,
            admission_refusal=admission_refusal(config.limits.max_concurrent_calls),
            tracing=telemetry.enabled,
            service_name=telemetry.service,
        )
        self._accounting = Accounting(plane, decider, self.plugins, self.events, telemetry)
        self._accounting.start()
        return plane

    def _observe(self) -> None:
        """Metrics read from the orchestrator's state at each export (no hot-path cost)."""
        tel = self.telemetry
        tel.observe(
            "sidemesh.calls.in_flight", "Calls being routed", "{call}",
            lambda: [Observation(self._plane.in_flight() if self._plane else 0)],
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
        tel.observe(
            "sidemesh.auth.calls",
            "Calls per principal since start: admitted, or refused by its rate or its "
            "calls-in-flight limit (sidemesh.outcome)", "{call}",
            self._auth_observations,
        )  # fmt: skip

    def _auth_observations(self) -> list[Observation]:
        if self.access is None:
            return []
        out = []
        for principal, counts in self.access.limits.counts().items():
            for outcome, count in zip(_LIMIT_OUTCOMES, counts, strict=True):
                if count or outcome == "admitted":
                    attributes = {"sidemesh.principal": principal, "sidemesh.outcome": outcome}
                    out.append(Observation(count, attributes))
        return out

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
        left = await self._drain(grace)
        # The callback sockets stay open while sidecars drain: calls still finishing
        # make callbacks, and sidecars send their last spans there as they exit.
        await self.supervisor.stop(left)
        if self._plane is not None:
            await asyncio.to_thread(self._plane.stop, 0.5)
        if self._accounting is not None:
            await self._accounting.stop()
        if self._internal is not None:
            await self._internal.stop(0.5)
        remove_mesh_cgroups()
        self._launcher.close()
        await asyncio.to_thread(self.telemetry.shutdown)
        with contextlib.suppress(FileNotFoundError):
            (self.config.state_dir / ENDPOINTS_FILE).unlink()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        log.info("stopped")

    async def _drain(self, grace: float) -> float:
        """Stops taking client calls and waits up to ``grace`` for those in flight.

        Calls still running then end UNAVAILABLE, saying the mesh is shutting
        down (not the stopping sidecar's "Cancelling all calls"). Returns the grace
        left for the sidecars (at least half a second, for their last spans).
        """
        plane = self._plane
        if plane is None:
            return grace
        for listener in self._client_listeners:
            plane.close_listener(listener)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while plane.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self._decider.closing = True
        if plane.in_flight():
            log.warning("ending %d calls still in flight after the grace period",
                        plane.in_flight())  # fmt: skip
            for plugin in self.plugins.values():
                for replica in plugin.replicas:
                    replica.withdraw()  # its calls end UNAVAILABLE: the mesh is shutting down
        return max(0.5, deadline - loop.time())


#: ``sidemesh.outcome`` of ``sidemesh.auth.calls``, in the order of ``PrincipalLimits.counts``.
_LIMIT_OUTCOMES = ("admitted", "rate_limited", "concurrency_limited")


def _listen(plane: dp.DataPlane, address: str, **options: Any) -> str:
    """Binds ``address`` in the data plane; returns it with the real port.

    Raises ``OSError`` with the fix (a Unix socket someone listens on, a port taken).
    """
    if address.startswith("unix:"):
        Path(address[len("unix:") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return plane.listen(address, **options)
    except OSError as exc:
        raise OSError(f"cannot listen on {address}: {exc}; is another mesh running?") from None


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
