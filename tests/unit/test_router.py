"""The router in-process, before a real gRPC "sidecar": raw forwarding and its failures."""

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
from orchestrator._replica import Replica, channel_options
from orchestrator._router import Admission, Router
from orchestrator._telemetry import Telemetry
from sidemesh.v1 import common_pb2, mesh_pb2, tool_pb2, tool_pb2_grpc


class _SlowTools(tool_pb2_grpc.ToolServiceServicer):
    """A sidecar whose tool streams progress until released."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.requests: list[tool_pb2.CallToolRequest] = []

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: Any
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        self.requests.append(request)
        self.started.set()
        yield tool_pb2.CallToolResponse(progress=common_pb2.Progress(progress=1))
        await asyncio.sleep(30)


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[tuple[AsyncMeshClient, _SlowTools, Replica]]:
    run = Path(tempfile.mkdtemp(prefix="smr", dir="/tmp"))
    sidecar = grpc.aio.server()
    tools = _SlowTools()
    tool_pb2_grpc.add_ToolServiceServicer_to_server(tools, sidecar)
    sidecar.add_insecure_port(f"unix:{run}/sidecar.sock")
    await sidecar.start()

    manifest = PluginManifest.model_validate(
        {"name": "slow", "version": "1", "entrypoint": ["unused"]}
    )
    config = MeshConfig(state_dir=tmp_path, runtime_dir=run)
    plugin = PluginRuntime("slow", manifest, PluginOverride(), config, None, str(tmp_path))
    replica = plugin.replicas[0]
    replica.channel = grpc.aio.insecure_channel(
        f"unix:{run}/sidecar.sock", options=channel_options(1 << 20)
    )
    replica.state = mesh_pb2.REPLICA_STATE_READY
    plugin.refresh_ready()
    catalog = Catalog()
    catalog.set_plugin("slow", [], [tool_pb2.ToolDescriptor(name="drip")])
    telemetry = Telemetry(TelemetrySettings(enabled=False), tmp_path)
    router_server = grpc.aio.server()
    Router(catalog, {"slow": plugin}, EventBus(), Admission(100), telemetry).register(router_server)
    router_server.add_insecure_port(f"unix:{run}/mesh.sock")
    await router_server.start()
    client = AsyncMeshClient(f"unix:{run}/mesh.sock", tracing=False)
    try:
        yield client, tools, replica
    finally:
        await client.close()
        await router_server.stop(0)
        await sidecar.stop(0)
        shutil.rmtree(run, ignore_errors=True)


async def test_the_target_is_rewritten_to_the_plugin_local_name(routed: Any) -> None:
    client, tools, _ = routed
    stream = client.call_tool_stream("slow/drip")
    first = await anext(aiter(stream))
    assert first.progress.progress == 1
    stream.cancel()
    assert tools.requests[0].tool == "drip"


async def test_a_replica_released_mid_call_ends_the_call_with_unavailable(routed: Any) -> None:
    """Regression: the channel cancelling our upstream call must not look like the caller
    cancelling (which left the caller without any status until its deadline)."""
    client, tools, replica = routed
    call = asyncio.create_task(client.call_tool("slow/drip", timeout=20))
    await asyncio.wait_for(tools.started.wait(), 5)
    await replica.kill()  # what the supervisor does when the sidecar exits
    with pytest.raises(UnavailableError) as info:
        await asyncio.wait_for(call, 5)
    assert "did not complete" in info.value.message
    assert replica.in_flight == 0
