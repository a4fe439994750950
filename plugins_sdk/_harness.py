"""``PluginHarness``: a plugin served in-process behind real gRPC, for the author's tests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Self

import grpc

from clients import AsyncMeshClient
from plugins_sdk._mesh_endpoint import EndpointCatalog, Routes, add_endpoint
from plugins_sdk._plugin import Plugin
from plugins_sdk._runner import serve_runtime
from plugins_sdk._runtime import AppRuntime
from sidemesh.core import SidemeshError, server_options, to_struct
from sidemesh.v1 import mesh_pb2_grpc, plugin_pb2, plugin_pb2_grpc

#: How long the harness waits for the app to serve.
_START_TIMEOUT = 10.0


class PluginHarness:
    """Serves ``app`` on a temporary Unix socket, as the sidecar runtime would.

    ``async with PluginHarness(app) as h:`` starts it, configures it with
    ``config`` (as the orchestrator does, so a bad config raises here), and
    gives ``h.client``, an ``AsyncMeshClient`` connected to it. The app's
    callbacks (``ctx.mesh``, ``ctx.call_tool``) reach ``mesh_apps`` (and the
    app itself), served in-process by name, ``plugin/name`` or a unique short
    name. Manifest permissions are not enforced here; the orchestrator does that.
    """

    def __init__(
        self,
        app: Plugin,
        config: Mapping[str, Any] | None = None,
        mesh_apps: Iterable[Plugin] = (),
    ) -> None:
        self.app = app
        self._config = dict(config or {})
        self._mesh_apps = list(mesh_apps)
        self._dir = ""
        self._serving: asyncio.Task[None] | None = None
        self._endpoints: list[grpc.aio.Server] = []
        self._runtimes: list[AppRuntime] = []
        self._client: AsyncMeshClient | None = None
        self._channel: grpc.aio.Channel | None = None
        #: The app's address, ``unix:/tmp/sm.../plugin.sock``.
        self.address = ""

    @property
    def client(self) -> AsyncMeshClient:
        """A mesh client connected to the app (tools, agents, chat, and listing both)."""
        if self._client is None:
            raise RuntimeError("use the harness inside 'async with PluginHarness(app) as h'")
        return self._client

    @property
    def channel(self) -> grpc.aio.Channel:
        """A raw channel to the app, for the generated stubs (``PluginService``, health)."""
        if self._channel is None:
            raise RuntimeError("use the harness inside 'async with PluginHarness(app) as h'")
        return self._channel

    @property
    def stopped(self) -> bool:
        """True once the app stopped serving (after ``PluginService.Shutdown``)."""
        return self._serving is None or self._serving.done()

    async def __aenter__(self) -> Self:
        self._dir = tempfile.mkdtemp(prefix="sm", dir="/tmp")
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._stop()

    async def configure(self, config: Mapping[str, Any]) -> None:
        """Sends ``config`` through ``PluginService.Configure``; raises ``SidemeshError``."""
        stub = plugin_pb2_grpc.PluginServiceStub(self.channel)
        try:
            await stub.Configure(plugin_pb2.ConfigureRequest(config=to_struct(config)))
        except grpc.RpcError as error:
            raise SidemeshError.from_rpc_error(error) from None

    async def _start(self) -> None:
        apps = [self.app, *self._mesh_apps]
        names = [a.name for a in apps]
        if len(set(names)) != len(names):
            raise ValueError(f"the harness's apps need distinct names, got {names}")
        self._runtimes = [
            AppRuntime(a, mesh_address=f"unix:{self._dir}/{i}.mesh.sock")
            for i, a in enumerate(apps)
        ]
        for i, runtime in enumerate(self._runtimes):
            await self._start_endpoint(runtime.app.name, runtime.mesh_address or "")
            if i:
                await runtime.configure({})
                await runtime.start()
        main = self._runtimes[0]
        self.address = f"unix:{self._dir}/plugin.sock"
        ready = asyncio.Event()
        catalog = EndpointCatalog(Routes([main], caller=""))
        self._serving = asyncio.create_task(
            serve_runtime(
                main,
                self.address,
                extra=partial(mesh_pb2_grpc.add_MeshServiceServicer_to_server, catalog),
                ready=ready,
            )
        )
        waiting = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {waiting, self._serving}, timeout=_START_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        waiting.cancel()
        if self._serving in done:
            self._serving.result()  # raises why it could not serve
        if not ready.is_set():
            raise TimeoutError(f"plugin {self.app.name!r} did not start serving")
        self._channel = grpc.aio.insecure_channel(self.address)
        self._client = AsyncMeshClient(self.address)
        await self.configure(self._config)

    async def _start_endpoint(self, caller: str, address: str) -> None:
        server = grpc.aio.server(options=server_options(16 * 1024 * 1024))
        add_endpoint(server, Routes(self._runtimes, caller=caller))
        server.add_insecure_port(address)
        await server.start()
        self._endpoints.append(server)

    async def _stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._channel is not None:
            await self._channel.close()
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
        for server in self._endpoints:
            await server.stop(None)
        for runtime in self._runtimes:
            await runtime.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
