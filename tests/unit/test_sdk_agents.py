"""plugins_sdk agents served behind real gRPC: streamed events, results, callbacks, errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import json_format
from pydantic import BaseModel

from clients import (
    AsyncMeshClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SidemeshError,
    UnknownError,
)
from plugins_sdk import (
    AgentContext,
    AgentInput,
    Log,
    Plugin,
    Progress,
    Result,
    ToolContext,
    serve,
)
from plugins_sdk.testing import PluginHarness
from sidemesh.v1 import agent_pb2

app = Plugin("agents", version="0.3.0")
tools = Plugin("tools")
seen: dict[str, Any] = {}
release = asyncio.Event()


class Numbers(BaseModel):
    values: list[int]


@app.agent(capabilities=["chat"])
async def narrator(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    """Streams every kind of event."""
    yield "Hello, "
    yield input.text
    yield Progress(1, 2, "half")
    yield Log("thinking", level="debug")
    yield {"session": ctx.session_id, "options": ctx.options, "turn": ctx.turn}


@app.agent(capabilities=["math"], input_model=Numbers)
async def summer(input: Numbers, ctx: AgentContext) -> AsyncIterator[Any]:
    yield f"sum={sum(input.values)}"
    yield Result(
        status="failed" if not input.values else "completed",
        message="nothing to add" if not input.values else "",
        usage={"input_tokens": 7},
        metadata={"model": "abacus"},
    )
    yield "never sent"


@app.agent()
async def single(input: AgentInput) -> str:
    """A coroutine agent: its return value is the one event."""
    return f"just {input.text}"


@app.agent()
async def helper(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    yield "adding: "
    result = await ctx.call_tool("tools/add", {"a": 2}, b=3)
    yield str((result.structured or {})["result"])
    if input.text == "fail":
        try:
            await ctx.call_tool("tools/nope")
        except NotFoundError:
            yield " (nope is missing)"
    if input.text == "facts":
        facts = await ctx.call_tool("facts")
        yield facts.structured or {}


@app.agent()
async def waits_for_tool(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    await ctx.call_tool("tools/gated")
    yield "gate opened"


@app.agent()
async def broken(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    yield "partial "
    if input.text == "sidemesh":
        raise FailedPreconditionError("not ready yet")
    if input.text == "type":
        yield 42
    raise KeyError("api-key-xyz")


@app.agent()
async def sleeper(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    yield "sleeping"
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        seen["cancelled"] = ctx.cancelled
        raise


@tools.tool()
async def add(a: int, b: int) -> int:
    return a + b


@tools.tool()
async def gated() -> str:
    await asyncio.wait_for(release.wait(), 5)
    return "open"


@tools.tool()
async def facts(ctx: ToolContext) -> dict[str, Any]:
    return {"caller": ctx.caller, "remaining": ctx.time_remaining()}


@pytest.fixture
async def h() -> AsyncIterator[PluginHarness]:
    seen.clear()
    release.clear()
    async with PluginHarness(app, mesh_apps=[tools]) as harness:
        yield harness


def kinds(events: list[Any]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


async def test_agent_streams_its_events_then_a_completed_result(h: PluginHarness) -> None:
    stream = h.client.invoke("narrator", "world", session_id="s1", options={"temperature": 0.5})
    events = [e async for e in stream]
    assert kinds(events) == ["text_delta", "text_delta", "progress", "log", "output", "result"]
    assert events[1].text_delta.text == "world"
    assert events[2].progress.total == 2
    assert events[3].log.message == "thinking"
    assert events[3].log.logger == "agents.narrator"
    assert events[-1].result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED
    reply = await h.client.invoke("narrator", "you").collect()
    assert reply.text == "Hello, you"
    assert reply.outputs == [{"session": "", "options": {}, "turn": 1}]
    output = json_format.MessageToDict(events[4].output.data)
    assert output == {"session": "s1", "options": {"temperature": 0.5}, "turn": 1}


async def test_result_ends_the_turn_with_its_status_usage_and_metadata(h: PluginHarness) -> None:
    reply = await h.client.invoke("summer", {"values": []}).collect()
    assert reply.text == "sum=0"
    assert reply.failed
    assert reply.result.message == "nothing to add"
    assert reply.result.usage.input_tokens == 7
    assert reply.result.metadata["model"] == "abacus"
    assert kinds(reply.events) == ["text_delta", "result"]


async def test_input_model_is_validated_with_field_paths(h: PluginHarness) -> None:
    assert (await h.client.invoke("summer", {"values": [1, 2.0]}).collect()).text == "sum=3"
    with pytest.raises(InvalidArgumentError) as info:
        await h.client.invoke("summer", {"values": [1, "x"]}).collect()
    assert [v.field for v in info.value.field_violations] == ["input.data.values[1]"]
    assert "invalid input for agent 'summer'" in info.value.message


async def test_coroutine_agent_and_capability_routing(h: PluginHarness) -> None:
    assert (await h.client.invoke("single", "one").collect()).text == "just one"
    reply = await h.client.invoke(capability="math", input={"values": [4]}).collect()
    assert reply.text == "sum=4"
    with pytest.raises(NotFoundError, match="capability 'poetry'"):
        await h.client.invoke(capability="poetry").collect()


async def test_unknown_agent_is_not_found_and_names_the_agents(h: PluginHarness) -> None:
    with pytest.raises(NotFoundError, match=r"no agent 'ghost'.*narrator, summer"):
        await h.client.invoke("ghost", "boo").collect()


async def test_call_tool_reports_started_and_finished_events(h: PluginHarness) -> None:
    reply = await h.client.invoke("helper", "").collect()
    assert kinds(reply.events) == [
        "text_delta",
        "tool_call_started",
        "tool_call_finished",
        "text_delta",
        "result",
    ]
    started, finished = reply.events[1].tool_call_started, reply.events[2].tool_call_finished
    assert started.tool == "tools/add"
    assert dict(started.arguments) == {"a": 2, "b": 3}
    assert finished.call_id == started.call_id
    assert json_format.MessageToDict(finished.result.structured_content) == {"result": 5}
    assert finished.error_code == 0
    assert reply.text == "adding: 5"
    assert reply.result.usage.tool_calls == 1


async def test_tool_call_started_is_sent_while_the_tool_runs(h: PluginHarness) -> None:
    stream = h.client.invoke("waits_for_tool", "")
    first = await anext(stream)
    assert first.WhichOneof("event") == "tool_call_started"
    release.set()
    rest = [e async for e in stream]
    assert kinds(rest) == ["tool_call_finished", "text_delta", "result"]


async def test_failed_tool_call_reports_the_status_and_raises(h: PluginHarness) -> None:
    reply = await h.client.invoke("helper", "fail").collect()
    finished = [e.tool_call_finished for e in reply.events if e.HasField("tool_call_finished")]
    assert finished[-1].error_code == 5  # NOT_FOUND
    assert "no tool named 'tools/nope'" in finished[-1].error_message
    assert reply.text == "adding: 5 (nope is missing)"


async def test_callbacks_carry_the_caller_and_inherit_the_deadline(h: PluginHarness) -> None:
    reply = await h.client.invoke("helper", "facts", timeout=5).collect()
    facts = reply.outputs[0]
    assert facts["caller"] == "agents"
    assert 0 < facts["remaining"] < 5.1  # gRPC rounds timeouts up on the wire
    reply = await h.client.invoke("helper", "facts").collect()
    assert reply.outputs[0]["remaining"] is None


async def test_errors_end_the_stream_with_a_status(h: PluginHarness) -> None:
    with pytest.raises(FailedPreconditionError, match="not ready yet"):
        await h.client.invoke("broken", "sidemesh").collect()
    with pytest.raises(UnknownError) as info:
        await h.client.invoke("broken", "bug").collect()
    assert info.value.message.startswith("agent 'broken' failed: KeyError (call id ")
    assert "api-key" not in info.value.message
    with pytest.raises(UnknownError, match="TypeError"):
        await h.client.invoke("broken", "type").collect()


async def test_cancelling_the_call_cancels_the_agent(h: PluginHarness) -> None:
    stream = h.client.invoke("sleeper", "")
    assert (await anext(stream)).text_delta.text == "sleeping"
    stream.cancel()
    for _ in range(100):
        if "cancelled" in seen:
            break
        await asyncio.sleep(0.01)
    assert seen == {"cancelled": True}


async def test_without_a_mesh_callbacks_fail_clearly() -> None:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    address = f"unix:{directory}/p.sock"
    server = asyncio.create_task(serve(app, address))
    while not await asyncio.to_thread(os.path.exists, f"{directory}/p.sock"):
        await asyncio.sleep(0.005)
    try:
        async with AsyncMeshClient(address) as client:
            await client.wait_for_ready(5)
            with pytest.raises(SidemeshError) as info:
                await client.invoke("helper", "").collect()
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        shutil.rmtree(directory, ignore_errors=True)
    assert isinstance(info.value, FailedPreconditionError)
    assert "no mesh address" in info.value.message
