"""plugins_sdk Chat: turns, input during a turn, cancel_turn, state, protocol errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from clients import ChatSession, InvalidArgumentError, SidemeshError, UnknownError
from plugins_sdk import AgentContext, AgentInput, Plugin
from plugins_sdk.testing import PluginHarness
from sidemesh.v1 import agent_pb2, agent_pb2_grpc

app = Plugin("talk")
seen: dict[str, Any] = {}


@app.agent(capabilities=["chat"])
async def counter(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    """Counts turns in the conversation state and echoes."""
    ctx.state["turns"] = ctx.state.get("turns", 0) + 1
    yield f"turn {ctx.turn} ({ctx.state['turns']} so far): {input.text}"


@app.agent()
async def gatherer(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    """Reads all the turn's input before answering."""
    parts = [input.text]
    async for more in ctx.more_input():
        parts.append(more.text)
    yield "+".join(parts)


@app.agent()
async def slow(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    yield f"working on {input.text}"
    if input.text == "long":
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen["cancelled"] = ctx.cancelled
            raise
    await asyncio.sleep(0.05)
    yield " done"


@app.agent()
async def fragile(input: AgentInput) -> AsyncIterator[Any]:
    if input.text == "boom":
        raise RuntimeError("boom")
    yield "fine"


@pytest.fixture
async def h() -> AsyncIterator[PluginHarness]:
    seen.clear()
    async with PluginHarness(app) as harness:
        yield harness


async def read_turn(chat: ChatSession) -> list[agent_pb2.ChatResponse]:
    events = []
    async for event in chat:
        events.append(event)
        if event.HasField("result"):
            return events
    raise AssertionError("the conversation ended without a result")


async def test_turns_are_numbered_and_share_the_conversation_state(h: PluginHarness) -> None:
    async with h.client.chat("counter") as chat:
        first = await chat.turn("hi")
        second = await chat.turn("again")
    assert first.text == "turn 1 (1 so far): hi"
    assert second.text == "turn 2 (2 so far): again"
    assert {e.turn for e in first.events if isinstance(e, agent_pb2.ChatResponse)} == {1}
    assert {e.turn for e in second.events if isinstance(e, agent_pb2.ChatResponse)} == {2}
    assert len(first.events) == len(second.events) == 2
    async with h.client.chat(capability="chat") as chat:
        assert (await chat.turn("new")).text == "turn 1 (1 so far): new"


async def test_input_during_a_turn_goes_to_more_input_until_end_turn(h: PluginHarness) -> None:
    async with h.client.chat("gatherer") as chat:
        await chat.send("a")
        await chat.send("b")
        await chat.send("c")
        await chat.end_turn()
        events = await read_turn(chat)
    assert events[0].text_delta.text == "a+b+c"


async def test_input_the_turn_did_not_read_starts_the_next_turn(h: PluginHarness) -> None:
    async with h.client.chat("counter") as chat:
        await chat.send("x")
        await chat.send("y")
        await chat.end_turn()
        first = await read_turn(chat)
        second = await read_turn(chat)
    assert first[0].text_delta.text == "turn 1 (1 so far): x"
    assert second[0].text_delta.text == "turn 2 (2 so far): y"


async def test_cancel_turn_cancels_the_turn_and_keeps_the_conversation(h: PluginHarness) -> None:
    async with h.client.chat("slow") as chat:
        await chat.send("long")
        await chat.end_turn()
        first = await anext(chat)
        assert first.text_delta.text == "working on long"
        await chat.cancel_turn()
        rest = await read_turn(chat)
        assert rest[-1].result.status == agent_pb2.AGENT_RESULT_STATUS_CANCELLED
        assert rest[-1].turn == 1
        assert seen == {"cancelled": True}
        assert (await chat.turn("short")).text == "working on short done"


async def test_half_close_ends_the_chat_after_the_running_turn(h: PluginHarness) -> None:
    chat = h.client.chat("slow")
    await chat.send("quick")
    await chat.close()
    events = [e async for e in chat]
    assert [e.WhichOneof("event") for e in events] == ["text_delta", "text_delta", "result"]
    assert chat.done()


async def test_an_error_in_a_turn_ends_the_chat_with_a_status(h: PluginHarness) -> None:
    async with h.client.chat("fragile") as chat:
        assert (await chat.turn("ok")).text == "fine"
        with pytest.raises(UnknownError, match="agent 'fragile' failed: RuntimeError"):
            await chat.turn("boom")


async def raw_chat(h: PluginHarness, *requests: agent_pb2.ChatRequest) -> SidemeshError:
    stub = agent_pb2_grpc.AgentServiceStub(h.channel)
    call = stub.Chat(iter(requests))
    with pytest.raises(grpc.RpcError) as info:
        async for _ in call:
            pass
    return SidemeshError.from_rpc_error(info.value)


async def test_a_chat_must_open_with_start(h: PluginHarness) -> None:
    error = await raw_chat(h, agent_pb2.ChatRequest(input=agent_pb2.AgentInput(text="hi")))
    assert isinstance(error, InvalidArgumentError)
    assert "must open with ChatRequest.start" in error.message


async def test_start_may_only_come_first(h: PluginHarness) -> None:
    start = agent_pb2.ChatRequest(start=agent_pb2.ChatStart(agent="counter"))
    error = await raw_chat(h, start, start)
    assert isinstance(error, InvalidArgumentError)
    assert "start may only be the first message" in error.message
