"""Calls through a real mesh: streaming, typed results, callbacks, errors, cancel, deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meshproc import DEMO_PLUGINS, TEST_PLUGINS, Mesh, wait_until

from clients import (
    AsyncMeshClient,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from sidemesh.v1 import agent_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One mesh for this module: the example plugins and the test workers."""
    m = Mesh(
        tmp_path_factory.mktemp("calls"),
        plugin_dirs=[*DEMO_PLUGINS, str(TEST_PLUGINS / "workers")],
    )
    try:
        m.start(ready=["tools-demo", "assistant", "workers"])
        yield m
        assert m.stop() == 0
        assert m.sidecars() == []
    finally:
        m.cleanup()


async def test_agent_answer_streams_in_order_and_completes(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        events = [e async for e in mesh_client.invoke("workers/ticker", {"count": 5})]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["text_delta"] * 5 + ["result"]
    assert "".join(e.text_delta.text for e in events[:-1]) == "".join(
        f"tick {i} " for i in range(5)
    )
    assert events[-1].result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED


async def test_example_agent_streams_token_by_token_and_calls_a_tool_through_the_mesh(
    mesh: Mesh,
) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        events = [e async for e in mesh_client.invoke("assistant", "What is 2 + 3?")]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("text_delta") > 3, "the answer should arrive in several pieces"
    started = next(e.tool_call_started for e in events if e.HasField("tool_call_started"))
    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert started.tool == "tools-demo/add"
    assert finished.error_code == 0
    assert kinds.index("tool_call_started") < kinds.index("tool_call_finished")
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert "5" in text
    assert kinds[-1] == "result"


async def test_tool_call_returns_typed_results(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        added = await mesh_client.call_tool("tools-demo/add", a=2, b=40)
        counted = await mesh_client.call_tool("word_count", text="one two three")
    assert not added.is_error
    assert added.structured == {"result": 42}
    assert counted.structured is not None
    assert counted.structured["words"] == 3


async def test_progress_events_arrive_before_the_result(mesh: Mesh) -> None:
    seen: list[float] = []
    async with AsyncMeshClient(mesh.address) as mesh_client:
        result = await mesh_client.call_tool(
            "tools-demo/slow_count", n=4, delay=0.01, on_progress=lambda p: seen.append(p.progress)
        )
    assert seen == [1, 2, 3, 4]
    assert not result.is_error


async def test_tool_failure_is_a_result_not_an_error(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        result = await mesh_client.call_tool("tools-demo/divide", a=1, b=0)
    assert result.is_error
    assert "zero" in result.text.lower()


async def test_callback_agent_to_mesh_to_tool_carries_the_callers_identity(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        reply = await mesh_client.invoke(
            "workers/delegator", {"tool": "workers/echo", "arguments": {"text": "ping"}}
        ).collect()
    assert reply.text == "ping"


async def test_callback_to_a_tool_outside_the_plugins_permissions_is_denied(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        stream = mesh_client.invoke(
            "workers/delegator", {"tool": "workers/sleepy", "arguments": {"seconds": 0, "tag": "x"}}
        )
        with pytest.raises(PermissionDeniedError) as info:
            await stream.collect()
    assert "permissions.tools" in info.value.message
    assert "workers/sleepy" in info.value.message


async def test_unknown_target_is_not_found_naming_the_closest(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        with pytest.raises(NotFoundError) as tool_error:
            await mesh_client.call_tool("tools-demo/ad", a=1, b=2)
        with pytest.raises(NotFoundError) as agent_error:
            await mesh_client.invoke("asistant", "hi").collect()
    assert "tools-demo/add" in tool_error.value.message
    assert "assistant" in agent_error.value.message
    assert tool_error.value.reason == "TARGET_NOT_FOUND"


async def test_invalid_tool_arguments_name_the_field(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        with pytest.raises(InvalidArgumentError) as info:
            await mesh_client.call_tool("tools-demo/add", a="two", b=3)
        with pytest.raises(InvalidArgumentError) as missing:
            await mesh_client.call_tool("tools-demo/add", a=1)
    assert [v.field for v in info.value.field_violations] == ["arguments.a"]
    assert "arguments.a" in info.value.message
    assert [v.field for v in missing.value.field_violations] == ["arguments.b"]


def _marker(mesh: Mesh, name: str) -> Path:
    return mesh.state_dir / "data" / "workers" / name


async def test_client_cancel_reaches_the_plugins_handler(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        task = asyncio.create_task(
            mesh_client.call_tool("workers/sleepy", seconds=30, tag="cancel-test")
        )
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    wait_until(_marker(mesh, "cancelled-cancel-test").exists, 5, "the handler to see the cancel")


async def test_deadline_ends_the_call_on_both_sides(mesh: Mesh) -> None:
    t0 = time.monotonic()
    async with AsyncMeshClient(mesh.address) as mesh_client:
        with pytest.raises(DeadlineExceededError):
            await mesh_client.call_tool("workers/sleepy", seconds=30, tag="deadline", timeout=0.5)
    assert time.monotonic() - t0 < 3
    wait_until(_marker(mesh, "cancelled-deadline").exists, 5, "the handler to be cancelled")


async def test_agents_route_by_capability(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client:
        reply = await mesh_client.invoke(capability="ticks", input={"count": 2}).collect()
    assert reply.text == "tick 0 tick 1 "


async def test_the_same_call_works_over_tcp(mesh: Mesh) -> None:
    # The owner's token, found in the state dir of the mesh that serves the address.
    async with AsyncMeshClient(mesh.tcp_address, state_dir=mesh.state_dir) as mesh_client:
        result = await mesh_client.call_tool("tools-demo/add", a=1, b=1)
    assert result.structured == {"result": 2}


def test_orchestrator_serves_health_and_reflection(mesh: Mesh) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(mesh.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for r in replies for s in r.list_services_response.service}
    assert {"sidemesh.v1.AgentService", "sidemesh.v1.ToolService", "sidemesh.v1.MeshService",
            "sidemesh.v1.McpService", "grpc.health.v1.Health"} <= services  # fmt: skip


async def test_chat_through_the_mesh_runs_turns_by_short_name(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address) as mesh_client, mesh_client.chat("ticker") as chat:
        first = await chat.turn({"count": 2})
        second = await chat.turn({"count": 3})
    assert first.text == "tick 0 tick 1 "
    assert second.text == "tick 0 tick 1 tick 2 "
    assert first.result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED


async def test_a_burst_of_streams_is_served_not_silently_cancelled(mesh: Mesh) -> None:
    """gRPC core cancels calls that wait past its pending limit (1,000 by default) before a
    Python server takes them; the orchestrator and the sidecars raise that limit, so a
    burst of callers is served and nobody sees a CANCELLED they did not ask for."""
    async with AsyncMeshClient(mesh.address, tracing=False) as mesh_client:

        async def one() -> str:
            try:
                reply = await mesh_client.invoke("workers/ticker", {"count": 1}).collect()
            except Exception as exc:  # the test counts every outcome
                return type(exc).__name__
            return "OK" if reply.text == "tick 0 " else "wrong"

        outcomes = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(1500))), 120)
    assert outcomes.count("OK") == 1500, {o: outcomes.count(o) for o in set(outcomes)}
