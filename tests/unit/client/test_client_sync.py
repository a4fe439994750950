"""The blocking client (MeshClient): the same calls, and its thread's life."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import Future

import pytest
from clientkit import WAIT, MeshServer

from clients import (
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    MeshClient,
    SidemeshError,
)

# -- the blocking client ------------------------------------------------------------------


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sidemesh-client")]


def test_sync_client_calls_and_stops_its_thread(mesh: MeshServer) -> None:
    before = set(_client_threads())
    with MeshClient(mesh.address, timeout=WAIT) as client:
        (thread,) = set(_client_threads()) - before
        events = [e.WhichOneof("event") for e in client.invoke("echo", "hi")]
        assert events == ["progress", "text_delta", "text_delta", "output", "result"]
        assert client.invoke("echo", "hi").collect().text == "you said: hi"
        callers: list[threading.Thread] = []
        result = client.call_tool(
            "add", a=2, b=3, on_progress=lambda _: callers.append(threading.current_thread())
        )
        assert result.structured == {"sum": 5, "args": {"a": 2, "b": 3}}
        assert callers == [threading.current_thread()] * 2
        assert client.call_tool_stream("add", a=1, b=2).collect().text == "3"
        assert [t.name for t in client.list_tools(plugin="math")] == ["add"]
        assert client.get_tool("add").qualified_name == "math/add"
        assert [a.name for a in client.list_agents()] == ["echo"]
        assert client.get_agent("echo").name == "echo"
        assert client.list_plugins()[0].name == "math"
        assert client.get_plugin("math").name == "math"
        assert len(client.list_traces()) == 2
        assert client.get_trace("4bf92f")[0].name == "root"
        with pytest.raises(InvalidArgumentError) as caught:
            client.invoke("reject").collect()
        assert caught.value.field_violations[0].field == "input.text"
        with pytest.raises(InternalError):
            client.call_tool("no-result")
    assert not thread.is_alive()
    with pytest.raises(FailedPreconditionError, match="closed"):
        client.list_tools()
    client.close()  # twice is fine


def test_sync_break_and_cancel_reach_the_server(mesh: MeshServer) -> None:
    with MeshClient(mesh.address) as client:
        for _ in client.invoke("hang"):
            break
        assert mesh.rec.cancelled.wait(WAIT)
        mesh.rec.cancelled.clear()
        stream = client.call_tool_stream("hang")
        assert next(stream).progress.message == "started"
        assert stream.cancel()
        assert mesh.rec.cancelled.wait(WAIT)
        with pytest.raises(CallCancelledError):
            next(stream)
        mesh.rec.cancelled.clear()
        events = client.watch_events(replay=2)
        assert [next(events).sequence, next(events).sequence] == [1, 2]
        events.close()
        assert mesh.rec.cancelled.wait(WAIT)


def test_sync_deadline_and_close_during_a_call(mesh: MeshServer) -> None:
    client = MeshClient(mesh.address)
    with pytest.raises(DeadlineExceededError):
        client.invoke("hang", timeout=0.1).collect()
    mesh.rec.cancelled.clear()
    stream = client.invoke("hang")
    next(stream)
    outcome: Future[BaseException | None] = Future()

    def read() -> None:
        try:
            next(stream)
        except BaseException as error:
            outcome.set_result(error)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.05)
    client.close()
    reader.join(WAIT)
    assert isinstance(outcome.result(WAIT), SidemeshError)
    assert mesh.rec.cancelled.wait(WAIT)


def test_sync_chat(mesh: MeshServer) -> None:
    with MeshClient(mesh.address) as client:
        with client.chat("echo-chat") as chat:
            assert chat.turn("one").text == "one"
            chat.send("two")
            chat.send("three")
            chat.end_turn()
            events = []
            for event in chat:
                events.append(event)
                if event.WhichOneof("event") == "result":
                    break
            assert events[0].text_delta.text == "two + three"
            assert events[-1].turn == 2
        assert mesh.rec.chat_half_closed.wait(WAIT)


def test_unclosed_sync_client_stops_its_thread_when_collected(mesh: MeshServer) -> None:
    before = set(_client_threads())
    client = MeshClient(mesh.address)
    assert client.list_plugins()
    (thread,) = set(_client_threads()) - before
    del client
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()
