"""``python -m sidecars.mcp``: start the MCP server, then serve it to the mesh until stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from plugins_sdk.serving import SIGNAL_GRACE, listen, sidecar_server, stop_on_signals
from sidecars._logging import LOG_LEVEL_ENV, configure_logging
from sidecars._telemetry import configure_tracing
from sidecars.mcp._link import ServerLink, StartupError
from sidecars.mcp._mcp_service import McpServicer
from sidecars.mcp._services import McpPluginServicer, McpToolServicer
from sidecars.mcp._spec import ServerSpec, SpecError
from sidecars.mcp._watchers import Watchers
from sidemesh.core import SidecarEnv, normalize_address, run_loop
from sidemesh.v1 import mcp_pb2_grpc, plugin_pb2_grpc, tool_pb2_grpc

log = logging.getLogger("sidecars.mcp")

LISTEN_ENV, PLUGIN_ENV = SidecarEnv.LISTEN, SidecarEnv.PLUGIN

#: Exit statuses: the sidecar cannot run (bad environment), the MCP server failed.
EXIT_UNUSABLE, EXIT_SERVER_FAILED = 2, 3
_USAGE = "usage: python -m sidecars.mcp  (the MCP server comes from $SIDEMESH_MCP_SERVER)"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bridge; returns the process's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    configure_logging(os.environ.get(LOG_LEVEL_ENV))
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per HTTP request otherwise
    if args:
        print(_USAGE, file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        address = normalize_address(os.environ.get(LISTEN_ENV, ""))
        spec = ServerSpec.from_environment()
    except (ValueError, SpecError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    plugin = os.environ.get(PLUGIN_ENV) or "mcp"
    tracing = configure_tracing(plugin, root_sampler=_NoBackgroundMcpTraffic())
    try:
        return run_loop(_serve(plugin, spec, address))
    finally:
        if tracing is not None:
            tracing.shutdown()


class _NoBackgroundMcpTraffic(Sampler):
    """Drops the MCP SDK's spans of the bridge's own traffic with its server.

    The MCP SDK traces each request it sends (``MCP send <method>``). Inside a
    mesh call those are children of the call's span, and kept; outside any (the
    handshake, list refreshes after a change) no mesh call caused them, so the
    mesh would refuse their traces: they are not recorded at all.
    """

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
        attributes: Any = None, links: Any = None, trace_state: Any = None,
    ) -> SamplingResult:  # fmt: skip
        if name.startswith("MCP send "):
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "NoBackgroundMcpTraffic"


class _Bridge:
    """The running sidecar: its link to the MCP server, its gRPC server, its stop."""

    def __init__(self, plugin: str, spec: ServerSpec) -> None:
        self.watchers = Watchers()
        self.link = ServerLink(spec, plugin, self.watchers)
        self.health = health_aio.HealthServicer()
        self._stop = asyncio.Event()
        self._grace = SIGNAL_GRACE

    async def request_stop(self, grace: float) -> None:
        """Starts draining: health ``NOT_SERVING``, watch streams end, calls get ``grace``."""
        if self._stop.is_set():
            return
        self._grace = grace
        self._stop.set()
        await self.health.enter_graceful_shutdown()
        self.watchers.close()

    def build_server(self) -> grpc.aio.Server:
        """The gRPC server with every service of the bridge."""
        server = sidecar_server()
        plugin_pb2_grpc.add_PluginServiceServicer_to_server(
            McpPluginServicer(self.link, self.request_stop), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        tool_pb2_grpc.add_ToolServiceServicer_to_server(McpToolServicer(self.link), server)
        mcp_pb2_grpc.add_McpServiceServicer_to_server(McpServicer(self.link), server)
        return server

    async def wait(self) -> float:
        """Waits for a stop request, or for the link to give up; returns the grace period."""
        stop = asyncio.create_task(self._stop.wait())
        failed = asyncio.create_task(self.link.failed.wait())
        try:
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
        if not self._stop.is_set():
            await self.request_stop(0.0)
        return self._grace


async def _serve(plugin: str, spec: ServerSpec, address: str) -> int:
    bridge = _Bridge(plugin, spec)
    stop_on_signals(plugin, bridge.request_stop)
    try:
        await bridge.link.start()
    except StartupError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_SERVER_FAILED
    server = bridge.build_server()
    try:
        listen(server, address)
    except OSError as exc:
        await bridge.link.close()
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    await server.start()
    try:
        await bridge.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "plugin %s bridging MCP server %s %s (%d tools) on %s", plugin,
            bridge.link.info.name, bridge.link.info.version, len(bridge.link.catalog), address,
        )  # fmt: skip
        grace = await bridge.wait()
        log.info("plugin %s stopping (grace %s s)", plugin, grace)
        await server.stop(grace)
    finally:
        await server.stop(None)
        await bridge.link.close()
    if bridge.link.failed.is_set():
        print(f"sidecar: {bridge.link.failure}", file=sys.stderr)
        return EXIT_SERVER_FAILED
    return 0
