"""``AppRuntime``: one served instance of a plugin: its config, health, mesh client, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from opentelemetry import trace

from clients import AsyncMeshClient
from plugins_sdk._agents import AgentSpec
from plugins_sdk._plugin import Plugin
from plugins_sdk._tools import ToolSpec
from sidemesh.core import FailedPreconditionError, InvalidArgumentError, NotFoundError

#: Config not given yet and the config model has required fields.
_UNCONFIGURED: Any = object()
#: Grace period for calls in flight when a stop does not say.
DEFAULT_GRACE = 10.0
#: Most names a NOT_FOUND message lists.
_MAX_NAMES = 20


class AppRuntime:
    """The state shared by all of one served plugin's calls.

    Health reports ``SERVING`` once the plugin can take calls: at start when
    its config model accepts an empty config (or it has none), else once
    ``Configure`` gave it a valid config.
    """

    def __init__(self, app: Plugin, *, mesh_address: str | None = None) -> None:
        self.app = app
        self.mesh_address = mesh_address
        self.health = health_aio.HealthServicer()
        #: The plugin's own tracer (``ctx.tracer``), named after it.
        self.tracer = trace.get_tracer(app.name, app.version)
        self._mesh: AsyncMeshClient | None = None
        self._stop = asyncio.Event()
        #: Seconds calls in flight get when the plugin stops; ``None``: until they finish.
        self.grace: float | None = None
        try:
            self._config: Any = app.validate_config({})
        except InvalidArgumentError:
            self._config = _UNCONFIGURED

    @property
    def configured(self) -> bool:
        """True once the plugin has a valid config."""
        return self._config is not _UNCONFIGURED

    @property
    def config(self) -> Any:
        """The validated config; ``FailedPreconditionError`` before ``Configure`` gave one."""
        if self._config is _UNCONFIGURED:
            raise FailedPreconditionError(
                f"plugin {self.app.name!r} has not been configured: its config model "
                "has required fields and PluginService.Configure has not been called"
            )
        return self._config

    async def start(self) -> None:
        """Sets the initial health status; call once the server is listening."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.configured
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def configure(self, data: Mapping[str, Any]) -> None:
        """Validates and applies the operator's config; ``InvalidArgumentError`` if rejected."""
        self._config = self.app.validate_config(data)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    # -- lookup ----------------------------------------------------------------

    def tool(self, target: str) -> ToolSpec:
        """The tool a request names (``name`` or ``plugin/name``); ``NotFoundError`` if none."""
        spec = self.app.tools.get(self._local(target))
        if spec is None:
            raise self._not_found("tool", target, list(self.app.tools))
        return spec

    def agent(self, target: str) -> AgentSpec:
        """The agent a request names (``name`` or ``plugin/name``); ``NotFoundError`` if none."""
        spec = self.app.agents.get(self._local(target))
        if spec is None:
            raise self._not_found("agent", target, list(self.app.agents))
        return spec

    def agent_by_capability(self, capability: str) -> AgentSpec:
        """The first agent declaring ``capability``; ``NotFoundError`` if none."""
        for spec in self.app.agents.values():
            if capability in spec.descriptor.capabilities:
                return spec
        raise NotFoundError(
            f"plugin {self.app.name!r} has no agent with capability {capability!r}",
            reason="TARGET_NOT_FOUND",
        )

    def _local(self, target: str) -> str:
        plugin, sep, name = target.rpartition("/")
        return name if sep and plugin == self.app.name else target

    def _not_found(self, kind: str, target: str, names: list[str]) -> NotFoundError:
        available = ", ".join(names[:_MAX_NAMES]) if names else "none"
        return NotFoundError(
            f"plugin {self.app.name!r} has no {kind} {target!r}; its {kind}s: {available}",
            reason="TARGET_NOT_FOUND",
        )

    # -- the mesh ----------------------------------------------------------------

    def mesh_client(self) -> AsyncMeshClient:
        """The plugin's client of the mesh, created on first use."""
        if self._mesh is None:
            if not self.mesh_address:
                raise FailedPreconditionError(
                    f"plugin {self.app.name!r} has no mesh address to call other tools "
                    "and agents: run it in the mesh, or give PluginHarness mesh_apps"
                )
            self._mesh = AsyncMeshClient(self.mesh_address)
        return self._mesh

    # -- stopping ------------------------------------------------------------------

    async def request_stop(self, grace: float | None) -> None:
        """Starts draining: health turns ``NOT_SERVING`` and the server stops within ``grace``."""
        await self.health.enter_graceful_shutdown()
        if not self._stop.is_set():
            self.grace = grace
            self._stop.set()

    async def wait_stop_requested(self) -> float | None:
        """Waits until a stop is requested; returns its grace period."""
        await self._stop.wait()
        return self.grace

    async def close(self) -> None:
        """Releases what the runtime holds (the mesh client)."""
        mesh, self._mesh = self._mesh, None
        if mesh is not None:
            await mesh.close()
