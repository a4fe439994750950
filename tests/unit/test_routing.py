"""Python decides, the data plane forwards: in-process, before real gRPC "sidecars".

A real ``DataPlane`` asks a real :class:`Decider` about each call; the
"sidecars" are grpc.aio servers on temp Unix sockets. What is checked: the
target rewrite, a replica withdrawn mid-call, when a call is tried again, and
what the records teach outlier ejection.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sidemesh_dataplane as dp

from clients import AsyncMeshClient, UnavailableError
from orchestrator._accounting import Accounting
from orchestrator._catalog import Catalog
from orchestrator._config import (
    MeshConfig,
    OutlierDetection,
    PluginOverride,
    RetryPolicy,
    TelemetrySettings,
)
from orchestrator._events import EventBus
from orchestrator._manifest import PluginManifest
from orchestrator._plugin import PluginRuntime
from orchestrator._routing import DATAPLANE_ROUTES, Decider, Upstreams
from orchestrator._telemetry import Telemetry
from sidemesh.v1 import common_pb2, mesh_pb2, tool_pb2, tool_pb2_grpc


class _Tools(tool_pb2_grpc.ToolServiceServicer):
    """A sidecar that answers, or hangs after ``hang_after`` progress events."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.targets: list[str] = []
        self.started = asyncio.Event()
        self.hang_after: int | None = None

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: Any
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        self.calls += 1
        self.targets.append(request.tool)
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
    config = MeshConfig(
        state_dir=tmp_path, runtime_dir=run,
        outlier_detection=OutlierDetection(consecutive_failures=2, base_ejection=30),
        # No floor: every retry is paid for by the calls before it (the budget's deposits).
        retries=RetryPolicy(budget_min_per_second=0, budget_percent=100),
    )  # fmt: skip
    plugin = PluginRuntime("p", manifest, PluginOverride(replicas=2), config, None, str(tmp_path))
    catalog = Catalog()
    idempotent = tool_pb2.ToolAnnotations(idempotent=True)
    catalog.set_plugin(
        "p", [], [tool_pb2.ToolDescriptor(name="same", annotations=idempotent),
                  tool_pb2.ToolDescriptor(name="once")],
    )  # fmt: skip
    plugins = {"p": plugin}
    decider = Decider(catalog, plugins)
    plane = dp.DataPlane(
        decider.decide, upstream_failed=decider.upstream_failed,
        retry_pick=decider.retry_pick, routes=DATAPLANE_ROUTES, tracing=False,
    )  # fmt: skip
    upstreams = Upstreams(plane, decider)
    for replica, name in zip(plugin.replicas, ("a", "b"), strict=True):
        replica.upstreams = upstreams
        replica._dial = f"unix:{run}/{name}.sock"
        replica.publish("1")
        replica.state = mesh_pb2.REPLICA_STATE_READY
    plugin.refresh_ready()
    address = plane.listen(f"unix:{run}/mesh.sock", listener_id="client")
    telemetry = Telemetry(TelemetrySettings(enabled=False), tmp_path)
    accounting = Accounting(plane, decider, plugins, EventBus(), telemetry, interval=0.02)
    accounting.start()
    client = AsyncMeshClient(address, tracing=False)
    try:
        yield client, plugin, tools
    finally:
        await client.close()
        await accounting.stop()
        await asyncio.to_thread(plane.stop, 0)
        for server in servers:
            await server.stop(0)
        shutil.rmtree(run, ignore_errors=True)


async def test_the_target_is_rewritten_to_the_plugin_local_name(mesh: Any) -> None:
    client, _, tools = mesh
    for _ in range(2):
        await client.call_tool("p/once", timeout=5)
    assert tools[0].targets + tools[1].targets == ["once", "once"]


async def test_a_call_that_never_reached_a_sidecar_is_retried_even_if_not_idempotent(
    mesh: Any,
) -> None:
    client, plugin, tools = mesh
    a = plugin.replicas[0]
    a.withdraw()
    a._dial = "unix:/nonexistent/sidecar.sock"
    a.publish("1")
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
    plugin.replicas[first].withdraw()  # what the supervisor does when a sidecar dies
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
    plugin.replicas[first].withdraw()
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
    plugin.replicas[index].withdraw()
    with pytest.raises(UnavailableError):
        async for _ in stream:
            pass
    assert tools[1 - index].calls == 0


async def test_replicas_whose_attempts_keep_failing_are_ejected(mesh: Any) -> None:
    """The records of failed attempts reach outlier ejection (two in a row, here)."""
    client, plugin, _ = mesh
    a = plugin.replicas[0]
    a.withdraw()
    a._dial = "unix:/nonexistent/sidecar.sock"
    a.publish("1")
    for _ in range(6):  # each never-reached attempt is retried on b: nobody sees a failure
        assert (await client.call_tool("p/once", timeout=5)).text == "b"
    for _ in range(50):
        if a.ejected_until:
            break
        await asyncio.sleep(0.02)
    assert a.ejected_until and "connection failures in a row" in a.ejection_reason
