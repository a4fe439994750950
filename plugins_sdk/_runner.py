"""Serving a plugin: ``serve`` (async, until shutdown) and ``run`` (a process's main), and the
parts every sidecar runtime serves with (its gRPC server, its listening socket, its signals)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2_grpc

from plugins_sdk._agent_service import AgentServicer
from plugins_sdk._plugin import Plugin
from plugins_sdk._plugin_service import PluginServicer
from plugins_sdk._runtime import AppRuntime
from plugins_sdk._tool_service import ToolServicer
from sidemesh.core import SidecarEnv, normalize_address, run_loop, server_options
from sidemesh.v1 import agent_pb2_grpc, plugin_pb2_grpc, tool_pb2_grpc

log = logging.getLogger("plugins_sdk")

LISTEN_ENV = SidecarEnv.LISTEN
MESH_ADDRESS_ENV = SidecarEnv.MESH_ADDRESS
#: Seconds calls in flight get after SIGTERM or SIGINT. The orchestrator sends
#: SIGTERM only once its own grace period is over, so this one is short.
SIGNAL_GRACE = 3.0
#: Largest message the sidecar sends or receives (the orchestrator's limit applies first).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def sidecar_server() -> grpc.aio.Server:
    """An empty gRPC server with the options every sidecar serves with."""
    return grpc.aio.server(options=server_options(MAX_MESSAGE_BYTES))


def listen(server: grpc.aio.Server, address: str) -> str:
    """Adds ``address`` (normalized, which it returns) as the server's listening socket.

    Raises ``OSError`` saying so when it cannot listen there.
    """
    address = normalize_address(address)
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        raise OSError(f"cannot listen on {address}: is its directory there and writable?") from None
    return address


def stop_on_signals(plugin: str, request_stop: Callable[[float], Awaitable[None]]) -> None:
    """On SIGTERM or SIGINT, logs it and calls ``request_stop(SIGNAL_GRACE)`` on the running
    loop."""
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Future[None]] = set()

    def on_signal(signum: int) -> None:
        log.info("plugin %s got %s", plugin, signal.Signals(signum).name)
        task = asyncio.ensure_future(request_stop(SIGNAL_GRACE))
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def build_server(runtime: AppRuntime) -> grpc.aio.Server:
    """A gRPC server with every service a sidecar serves, for ``runtime``."""
    server = sidecar_server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(PluginServicer(runtime), server)
    health_pb2_grpc.add_HealthServicer_to_server(runtime.health, server)
    tool_pb2_grpc.add_ToolServiceServicer_to_server(ToolServicer(runtime), server)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(runtime), server)
    return server


async def serve(app: Plugin, address: str, *, mesh_address: str | None = None) -> None:
    """Serves ``app`` on ``address`` until ``PluginService.Shutdown`` (or cancellation).

    ``mesh_address`` is where callbacks go (``ctx.mesh``); without one, they
    fail with ``FAILED_PRECONDITION``.
    """
    await serve_runtime(AppRuntime(app, mesh_address=mesh_address), address)


async def serve_runtime(
    runtime: AppRuntime,
    address: str,
    *,
    extra: Callable[[grpc.aio.Server], None] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Serves ``runtime`` on ``address`` until a stop is requested, then drains.

    ``extra`` adds more services to the server; ``ready`` is set once it serves.
    Raises ``OSError`` when it cannot listen on ``address``.
    """
    server = build_server(runtime)
    if extra is not None:
        extra(server)
    address = listen(server, address)
    await server.start()
    try:
        await runtime.start()
        if ready is not None:
            ready.set()
        log.info(
            "plugin %s %s serving %d tools and %d agents on %s",
            runtime.app.name,
            runtime.app.version,
            len(runtime.app.tools),
            len(runtime.app.agents),
            address,
        )
        grace = await runtime.wait_stop_requested()
        log.info("plugin %s stopping (grace %s s)", runtime.app.name, grace)
        await server.stop(grace)
    finally:
        await server.stop(None)
        await runtime.close()


def run(app: Plugin) -> None:
    """Serves ``app`` as a sidecar: on ``$SIDEMESH_LISTEN``, until Shutdown, SIGTERM or SIGINT.

    Callbacks go to ``$SIDEMESH_MESH_ADDRESS``. Returns once the server has
    drained, so the process can exit 0.
    """
    address = os.environ.get(LISTEN_ENV, "")
    if not address:
        sys.exit(f"{LISTEN_ENV} is not set: the address to serve on, e.g. unix:/tmp/plugin.sock")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runtime = AppRuntime(app, mesh_address=os.environ.get(MESH_ADDRESS_ENV) or None)
    run_loop(_main(runtime, address))


async def _main(runtime: AppRuntime, address: str) -> None:
    stop_on_signals(runtime.app.name, runtime.request_stop)
    await serve_runtime(runtime, address)
