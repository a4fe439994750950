"""plugins_sdk PluginService and health: what the orchestrator sees of a sidecar."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field

from clients import (
    AsyncMeshClient,
    CallCancelledError,
    InvalidArgumentError,
    UnavailableError,
)
from plugins_sdk import AgentInput, Plugin, ToolContext, serve
from plugins_sdk.testing import PluginHarness
from sidemesh.v1 import plugin_pb2, plugin_pb2_grpc


class Settings(BaseModel):
    api_url: str
    retries: int = Field(3, ge=0)


app = Plugin("configured", version="1.0.0", description="needs config", config_model=Settings)
free = Plugin("free", version="0.1.0")


@app.tool()
async def settings(ctx: ToolContext) -> dict[str, Any]:
    config: Settings = ctx.config
    return config.model_dump()


@app.agent(capabilities=["x"])
async def agent(input: AgentInput) -> AsyncIterator[str]:
    """An agent."""
    yield input.text


@free.tool()
async def config_dict(ctx: ToolContext) -> dict[str, Any]:
    return {"config": ctx.config}


@free.tool()
async def takes(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


async def health_status(channel: grpc.aio.Channel) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return name


async def test_describe_reports_identity_agents_and_tools() -> None:
    async with PluginHarness(app, config={"api_url": "http://x"}) as h:
        stub = plugin_pb2_grpc.PluginServiceStub(h.channel)
        described = await stub.Describe(plugin_pb2.DescribeRequest())
    info = described.plugin
    assert (info.name, info.version, info.description) == ("configured", "1.0.0", "needs config")
    assert info.contract_version == "sidemesh.v1"
    assert info.runtime == "sidemesh-python/0.1.0"
    assert [a.name for a in described.agents] == ["agent"]
    assert [t.name for t in described.tools] == ["settings"]


async def test_configure_validates_with_the_config_model() -> None:
    async with PluginHarness(app, config={"api_url": "http://x", "retries": 5.0}) as h:
        result = await h.client.call_tool("settings")
        assert result.structured == {"api_url": "http://x", "retries": 5}
        with pytest.raises(InvalidArgumentError) as info:
            await h.configure({"retries": -1})
        error = info.value
        assert error.reason == "INVALID_CONFIG"
        assert {v.field for v in error.field_violations} == {"config.api_url", "config.retries"}
        assert "invalid config for plugin 'configured'" in error.message
        # The valid config stays in force.
        assert (await h.client.call_tool("settings")).structured == result.structured


async def test_a_bad_config_fails_the_harness_like_the_orchestrator() -> None:
    with pytest.raises(InvalidArgumentError, match=r"config\.api_url"):
        async with PluginHarness(app):
            pass


async def test_without_a_config_model_the_config_is_a_dict() -> None:
    async with PluginHarness(free, config={"greeting": "hi"}) as h:
        result = await h.client.call_tool("config_dict")
    assert result.structured == {"config": {"greeting": "hi"}}


async def serving(plugin: Plugin) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    address = f"unix:{directory}/p.sock"
    task = asyncio.create_task(serve(plugin, address))
    # Connect only once it listens: an earlier attempt would back off for a second.
    while not await asyncio.to_thread(os.path.exists, f"{directory}/p.sock"):
        await asyncio.sleep(0.005)
    try:
        yield address, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        shutil.rmtree(directory, ignore_errors=True)


async def test_health_serves_once_the_plugin_is_configured() -> None:
    async for address, _ in serving(app):
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 5)
            assert await health_status(channel) == "NOT_SERVING"
            stub = plugin_pb2_grpc.PluginServiceStub(channel)
            config = plugin_pb2.ConfigureRequest()
            config.config.update({"api_url": "http://x"})
            await stub.Configure(config)
            assert await health_status(channel) == "SERVING"
    async for address, _ in serving(free):
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 5)
            assert await health_status(channel) == "SERVING"


async def test_shutdown_drains_in_flight_calls_then_serve_returns() -> None:
    async for address, task in serving(free):
        async with AsyncMeshClient(address) as client, grpc.aio.insecure_channel(address) as ch:
            await client.wait_for_ready(5)
            in_flight = asyncio.create_task(client.call_tool("takes", seconds=0.3))
            await asyncio.sleep(0.1)
            grace = duration_pb2.Duration(seconds=5)
            await plugin_pb2_grpc.PluginServiceStub(ch).Shutdown(
                plugin_pb2.ShutdownRequest(grace_period=grace)
            )
            # No new calls once draining (gRPC refuses them as UNAVAILABLE or CANCELLED).
            with pytest.raises((UnavailableError, CallCancelledError)):
                await client.call_tool("takes", seconds=0)
            assert (await in_flight).text == "finished"
            await asyncio.wait_for(task, 5)
        assert task.done() and task.exception() is None


async def test_shutdown_grace_cuts_long_calls() -> None:
    async for address, task in serving(free):
        async with AsyncMeshClient(address) as client, grpc.aio.insecure_channel(address) as ch:
            await client.wait_for_ready(5)
            in_flight = asyncio.create_task(client.call_tool("takes", seconds=30))
            await asyncio.sleep(0.1)
            await plugin_pb2_grpc.PluginServiceStub(ch).Shutdown(
                plugin_pb2.ShutdownRequest(grace_period=duration_pb2.Duration(nanos=100_000_000))
            )
            await asyncio.wait_for(task, 5)
            with pytest.raises(Exception):  # noqa: B017, PT011 - any failure: the call was cut
                await in_flight
