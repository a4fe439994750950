"""The router's retries in-process, before real gRPC "sidecars": when a call is tried again."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import AsyncMeshClient, UnavailableError
from orchestrator._catalog import Catalog
from orchestrator._config import MeshConfig, PluginOverride, TelemetrySettings
from orchestrator._events import EventBus
from orchestrator._manifest import PluginManifest
from orchestrator._plugin import PluginRuntime
from orchestrator._replica import channel_options
from orchestrator._router import Admission, Router
from orchestrator._telemetry import Telemetry
from sidemesh.v1 import common_pb2, mesh_pb2, tool_pb2, tool_pb2_grpc


class _Tools(tool_pb2_grpc.ToolServiceServicer):
    """A sidecar that answers, or hangs after ``hang_after`` progress events."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.started = asyncio.Event()
        self.hang_after: int | None = None

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: Any
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        self.calls += 1
        if self.hang_after is not None:
            for _ in range(self.hang_after):
                yield tool_pb2.CallToolResponse(progress=common_pb2.Progress(progress=1))
            self.started.set()
            await asyncio.sleep(30)
        result = tool_pb2.ToolResult(content=[common_pb2.Content(text=self.name)])
        yield tool_pb2.CallToolResponse(result=result)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[tuple[AsyncMeshClient, PluginRuntime, list[Any]]]:
    run = Path(tempfile.mkdtemp(prefix="smr", dir="/tmp"))
    servers, tools = [], []
    for name in ("a", "b"):
        server = grpc.aio.server()
        servicer = _Tools(name)
        tool_pb2_grpc.add_ToolServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{run}/{name}.sock")
        await server.start()
        servers.append(server)
        tools.append(servicer)
    manifest = PluginManifest.model_validate({"name": "p", "version": "1", "entrypoint": ["x"]})
    config = MeshConfig(state_dir=tmp_path, runtime_dir=run)
    plugin = PluginRuntime("p", manifest, PluginOverride(replicas=2), config, None, str(tmp_path))
    for replica, name in zip(plugin.replicas, ("a", "b"), strict=True):
        replica.channel = grpc.aio.insecure_channel(
            f"unix:{run}/{name}.sock", options=channel_options(1 << 20)
        )
        replica.state = mesh_pb2.REPLICA_STATE_READY
    plugin.refresh_ready()
    catalog = Catalog()
    idempotent = tool_pb2.ToolAnnotations(idempotent=True)
    catalog.set_plugin(
        "p", [], [tool_pb2.ToolDescriptor(name="same", annotations=idempotent),
                  tool_pb2.ToolDescriptor(name="once")],
    )  # fmt: skip
    router_server = grpc.aio.server()
    telemetry = Telemetry(TelemetrySettings(enabled=False), tmp_path)
    Router(catalog, {"p": plugin}, EventBus(), Admission(100), telemetry).register(router_server)
    router_server.add_insecure_port(f"unix:{run}/mesh.sock")
    await router_server.start()
    client = AsyncMeshClient(f"unix:{run}/mesh.sock", tracing=False)
    try:
        yield client, plugin, tools
    finally:
        await client.close()
        for server in (router_server, *servers):
            await server.stop(0)
        shutil.rmtree(run, ignore_errors=True)


async def test_a_call_that_never_reached_a_sidecar_is_retried_even_if_not_idempotent(
    mesh: Any,
) -> None:
    client, plugin, tools = mesh
    a = plugin.replicas[0]
    await a.channel.close()
    a.channel = grpc.aio.insecure_channel("unix:/nonexistent/sidecar.sock")
    for _ in range(4):  # round robin picks the dead one half of the time
        result = await client.call_tool("p/once", timeout=5)
        assert result.text == "b"
    assert tools[0].calls == 0


async def test_an_idempotent_call_whose_sidecar_went_away_is_retried_elsewhere(
    mesh: Any,
) -> None:
    client, plugin, tools = mesh
    tools[0].hang_after = tools[1].hang_after = 0
    call = asyncio.create_task(client.call_tool("p/same", timeout=10))
    await asyncio.sleep(0.3)
    first = 0 if tools[0].started.is_set() else 1
    tools[1 - first].hang_after = None  # the other one answers
    await plugin.replicas[first].kill()  # what the supervisor does when a sidecar dies
    result = await asyncio.wait_for(call, 5)
    assert result.text == "ab"[1 - first]


async def test_a_call_that_reached_its_sidecar_is_not_retried_unless_idempotent(
    mesh: Any,
) -> None:
    client, plugin, tools = mesh
    tools[0].hang_after = tools[1].hang_after = 0
    call = asyncio.create_task(client.call_tool("p/once", timeout=10))
    await asyncio.sleep(0.3)
    first = 0 if tools[0].started.is_set() else 1
    await plugin.replicas[first].kill()
    with pytest.raises(UnavailableError, match="did not complete"):
        await asyncio.wait_for(call, 5)
    assert tools[1 - first].calls == 0


async def test_no_retry_once_a_response_reached_the_caller(mesh: Any) -> None:
    client, plugin, tools = mesh
    tools[0].hang_after = tools[1].hang_after = 1  # one progress event, then hang
    stream = client.call_tool_stream("p/same", timeout=10)
    first = await anext(aiter(stream))
    assert first.HasField("progress")
    index = 0 if tools[0].started.is_set() else 1
    await plugin.replicas[index].kill()
    with pytest.raises(UnavailableError):
        async for _ in stream:
            pass
    assert tools[1 - index].calls == 0
