"""The Python client's streams: cancellation, deadlines, limits, interceptors, chat."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from clientkit import WAIT, MeshServer, wait_for
from google.protobuf import json_format

from clients import (
    AsyncMeshClient,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from sidemesh.v1 import (
    agent_pb2,
)

# -- cancellation and deadlines -------------------------------------------------------


async def test_stream_cancel_reaches_the_server(client: AsyncMeshClient, mesh: MeshServer) -> None:
    stream = client.invoke("hang")
    first = await anext(stream)
    assert first.text_delta.text == "working"
    assert stream.cancel()
    assert await wait_for(mesh.rec.cancelled)
    with pytest.raises(CallCancelledError):
        await anext(stream)
    with pytest.raises(CallCancelledError):
        await stream.collect()


async def test_reading_one_event_then_the_rest_is_one_call(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    stream = client.invoke("echo", "hi")
    first = await anext(aiter(stream))  # a one-off iterator must not end the call
    rest = [event async for event in stream]
    kinds = [e.WhichOneof("event") for e in (first, *rest)]
    assert kinds == ["progress", "text_delta", "text_delta", "output", "result"]
    assert not mesh.rec.cancelled.is_set()


async def test_leaving_async_for_early_cancels_the_call(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    async for _ in client.invoke("hang"):
        break
    assert await wait_for(mesh.rec.cancelled)


async def test_async_with_stream_cancels_on_exit(client: AsyncMeshClient, mesh: MeshServer) -> None:
    async with client.invoke("hang") as stream:
        await anext(stream)
    assert await wait_for(mesh.rec.cancelled)
    assert stream.done()


async def test_cancelling_the_task_cancels_the_call(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in client.invoke("hang"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_for(mesh.rec.cancelled)


async def test_closing_the_client_cancels_running_calls(mesh: MeshServer) -> None:
    client = AsyncMeshClient(mesh.address)
    stream = client.invoke("hang")
    await anext(stream)
    reader = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(CallCancelledError):
        await reader
    assert await wait_for(mesh.rec.cancelled)
    with pytest.raises(FailedPreconditionError, match="closed"):
        await client.list_tools()


async def test_deadline_is_sent_and_exceeded(mesh: MeshServer) -> None:
    async with AsyncMeshClient(mesh.address, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await client.invoke("hang").collect()
        assert time.monotonic() - started < 2
        assert await wait_for(mesh.rec.cancelled)
        remaining = mesh.rec.time_remaining[-1]
        assert remaining is not None
        assert 0 < remaining < 0.35
        # A per-call timeout wins over the client's default.
        with pytest.raises(DeadlineExceededError):
            await client.call_tool("hang", timeout=0.1)
        assert (mesh.rec.time_remaining[-1] or 0) < 0.15


async def test_nothing_listening_is_unavailable() -> None:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    try:
        async with AsyncMeshClient(f"unix:{directory}/none.sock", timeout=WAIT) as client:
            with pytest.raises(UnavailableError):
                await client.list_tools()
            with pytest.raises(UnavailableError):
                await client.call_tool("add", a=1, b=2)
            with pytest.raises(UnavailableError):
                await client.wait_for_ready(timeout=0.1)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_max_message_bytes_limits_what_is_received(mesh: MeshServer) -> None:
    async with AsyncMeshClient(mesh.address, max_message_bytes=4096) as client:
        with pytest.raises(ResourceExhaustedError):
            await client.invoke("big").collect()
        assert (await client.invoke("echo", "small").collect()).text == "you said: small"


class _TagInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = [*(client_call_details.metadata or ()), ("x-intercepted", "yes")]
        return await continuation(client_call_details._replace(metadata=metadata), request)


async def test_interceptors_wrap_calls(mesh: MeshServer) -> None:
    async with AsyncMeshClient(mesh.address, interceptors=[_TagInterceptor()]) as client:
        assert (await client.invoke("echo", "x").collect()).text == "you said: x"
        assert mesh.rec.metadata[-1]["x-intercepted"] == "yes"
        with pytest.raises(InvalidArgumentError):
            await client.invoke("reject").collect()


# -- chat -------------------------------------------------------------------------------


async def test_chat_turns_and_clean_close(client: AsyncMeshClient, mesh: MeshServer) -> None:
    async with client.chat("echo-chat", session_id="c-1", options={"mode": "terse"}) as chat:
        first = await chat.turn("hello")
        assert first.text == "hello"
        assert first.result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED
        assert {e.turn for e in first.events} == {1}
        second = await chat.turn({"ignored": True})
        assert {e.turn for e in second.events} == {2}
    start = mesh.rec.requests[0]
    assert start.WhichOneof("message") == "start"
    assert (start.start.agent, start.start.session_id) == ("echo-chat", "c-1")
    assert json_format.MessageToDict(start.start.options) == {"mode": "terse"}
    assert mesh.rec.metadata[0]["x-client"] == "tests"
    assert await wait_for(mesh.rec.chat_half_closed)
    assert not mesh.rec.cancelled.is_set()
    assert chat.done()


async def test_chat_send_adds_to_the_running_turn(client: AsyncMeshClient) -> None:
    chat = client.chat("echo-chat")
    await chat.send("a")
    await chat.send("b")
    assert chat.turn_running
    await chat.end_turn()
    events = []
    async for event in chat:
        events.append(event)
        if event.WhichOneof("event") == "result":
            break
    assert events[0].text_delta.text == "a + b"
    assert not chat.turn_running
    await chat.send("c")
    await chat.cancel_turn()
    result = await anext(chat)
    assert result.result.status == agent_pb2.AGENT_RESULT_STATUS_CANCELLED
    await chat.close()
    assert [e async for e in chat] == []


async def test_chat_turn_while_a_turn_runs_is_refused(client: AsyncMeshClient) -> None:
    async with client.chat("echo-chat") as chat:
        await chat.send("a")
        with pytest.raises(FailedPreconditionError, match="turn"):
            await chat.turn("b")
        await chat.cancel_turn()
        await anext(chat)


async def test_chat_ending_without_the_turns_result_is_an_internal_error(
    client: AsyncMeshClient,
) -> None:
    async with client.chat("chat-drop") as chat:
        with pytest.raises(InternalError, match="without a result"):
            await chat.turn("hi")


async def test_chat_exit_with_an_exception_cancels(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    async def converse() -> None:
        async with client.chat("chat-hang") as chat:
            await chat.send("go")
            await chat.end_turn()
            assert (await anext(chat)).text_delta.text == "working"
            raise RuntimeError("user code")

    with pytest.raises(RuntimeError, match="user code"):
        await converse()
    assert await wait_for(mesh.rec.cancelled)


async def test_chat_deadline(mesh: MeshServer) -> None:
    async with AsyncMeshClient(mesh.address) as client:
        chat = client.chat("chat-hang", timeout=0.2)
        with pytest.raises(DeadlineExceededError):
            await chat.turn("go")
        with pytest.raises(DeadlineExceededError):
            await chat.send("again")
