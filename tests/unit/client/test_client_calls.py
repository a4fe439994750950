"""The Python client's calls: agents, tools, the catalog, errors; what a user sees."""

from __future__ import annotations

import grpc
import pytest
from clientkit import WAIT, MeshServer, make_struct, wait_for
from google.protobuf import json_format

from clients import (
    AsyncMeshClient,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ToolCallResult,
    UnavailableError,
)
from sidemesh.core import DEFAULT_TCP_ADDRESS, FieldViolation
from sidemesh.v1 import (
    agent_pb2,
    common_pb2,
    mesh_pb2,
    tool_pb2,
)

# -- the package (its public names are pinned in tests/unit/test_public_api.py) -------


def test_address_defaults_to_env_then_default_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDEMESH_ADDRESS", raising=False)
    assert AsyncMeshClient().address == DEFAULT_TCP_ADDRESS
    monkeypatch.setenv("SIDEMESH_ADDRESS", "unix:///tmp/mesh.sock")
    assert AsyncMeshClient().address == "unix:/tmp/mesh.sock"
    assert AsyncMeshClient("/tmp/other.sock").address == "unix:/tmp/other.sock"
    with pytest.raises(ValueError, match="host:port"):
        AsyncMeshClient("nonsense")


def test_tool_call_result_from_proto() -> None:
    raw = tool_pb2.ToolResult(
        content=[
            common_pb2.Content(text="line 1"),
            common_pb2.Content(blob=common_pb2.Blob(data=b"\x89PNG", mime_type="image/png")),
            common_pb2.Content(text="line 2"),
        ],
        structured_content=make_struct({"n": 3, "ratio": 0.5, "items": [1, 2.5]}),
    )
    result = ToolCallResult.from_proto(raw)
    assert result.text == "line 1\nline 2"
    assert result.structured == {"n": 3, "ratio": 0.5, "items": [1, 2.5]}
    assert isinstance(result.structured["n"], int)
    assert result.is_error is False
    assert result.raw is raw
    assert len(result.content) == 3
    assert ToolCallResult.from_proto(tool_pb2.ToolResult()).structured is None


# -- agents: Invoke ---------------------------------------------------------------


async def test_invoke_streams_events_in_order(client: AsyncMeshClient, mesh: MeshServer) -> None:
    kinds = [event.WhichOneof("event") async for event in client.invoke("echo", "hi")]
    assert kinds == ["progress", "text_delta", "text_delta", "output", "result"]


async def test_invoke_collect_and_request_fields(client: AsyncMeshClient, mesh: MeshServer) -> None:
    reply = await client.invoke(
        "echo",
        "hello",
        session_id="s-1",
        options={"temperature": 0.2},
        metadata=[("x-call", "one")],
    ).collect()
    assert reply.text == "you said: hello"
    assert reply.result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED
    assert not reply.failed
    assert reply.outputs == [{"data": {}, "options": {"temperature": 0.2}, "session": "s-1"}]
    assert [e.WhichOneof("event") for e in reply.events][-1] == "result"
    request = mesh.rec.requests[-1]
    assert (request.agent, request.input.text, request.session_id) == ("echo", "hello", "s-1")
    assert mesh.rec.metadata[-1]["x-client"] == "tests"
    assert mesh.rec.metadata[-1]["x-call"] == "one"


async def test_invoke_with_a_mapping_sends_data_and_routes_by_capability(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    reply = await client.invoke(input={"n": 2, "tags": ["a"]}, capability="chat").collect()
    assert reply.outputs[0]["data"] == {"n": 2, "tags": ["a"]}
    assert mesh.rec.requests[-1].capability == "chat"
    explicit = agent_pb2.AgentInput(text="t", data=make_struct({"k": "v"}))
    assert (await client.invoke("echo", explicit).collect()).outputs[0]["data"] == {"k": "v"}


async def test_failed_task_is_a_result_not_an_error(client: AsyncMeshClient) -> None:
    reply = await client.invoke("failing-task").collect()
    assert reply.failed
    assert reply.result.message == "no answer"


async def test_error_at_start_keeps_code_message_and_details(client: AsyncMeshClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        async for _ in client.invoke("reject", ""):
            pass
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "input.text must not be empty"
    assert error.reason == "INVALID_INPUT"
    assert error.field_violations == (FieldViolation("input.text", "must not be empty"),)
    assert not isinstance(error, grpc.RpcError)


async def test_error_mid_stream_arrives_after_the_events_before_it(
    client: AsyncMeshClient,
) -> None:
    seen: list[str] = []

    async def read() -> None:
        async for event in client.invoke("midway"):
            seen.append(event.text_delta.text)

    with pytest.raises(UnavailableError, match="the sidecar died") as caught:
        await read()
    assert seen == ["starting"]
    assert caught.value.reason == "SIDECAR_EXITED"
    with pytest.raises(UnavailableError):
        await client.invoke("midway").collect()


async def test_stream_without_a_result_is_an_internal_error(client: AsyncMeshClient) -> None:
    stream = client.invoke("no-result")
    with pytest.raises(InternalError, match="agent 'no-result' ended without a result event"):
        async for _ in stream:
            pass
    with pytest.raises(InternalError, match="without a result event"):
        await client.invoke("no-result").collect()


async def test_events_after_the_result_are_an_internal_error(client: AsyncMeshClient) -> None:
    with pytest.raises(InternalError, match="after its result"):
        await client.invoke("after-result").collect()


async def test_unknown_agent_is_not_found(client: AsyncMeshClient) -> None:
    with pytest.raises(NotFoundError, match="nobody"):
        await client.invoke("nobody").collect()


# -- tools ------------------------------------------------------------------------


async def test_call_tool_returns_typed_result_and_reports_progress(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    progress: list[str] = []
    logs: list[str] = []

    async def on_log(record: common_pb2.LogRecord) -> None:
        logs.append(record.message)

    result = await client.call_tool(
        "add",
        {"a": 2, "b": 100},
        b=3,
        on_progress=lambda p: progress.append(f"{p.progress:g}/{p.total:g} {p.message}"),
        on_log=on_log,
    )
    assert result.text == "5"
    assert result.structured == {"sum": 5, "args": {"a": 2, "b": 3}}
    assert result.is_error is False
    assert progress == ["1/2 read a", "2/2 read b"]
    assert logs == ["adding"]
    assert json_format.MessageToDict(mesh.rec.requests[-1].arguments) == {"a": 2, "b": 3}


async def test_tool_failing_at_its_task_is_a_result(client: AsyncMeshClient) -> None:
    result = await client.call_tool("oops")
    assert result.is_error
    assert result.text == "unknown timezone"
    assert result.structured is None


async def test_bad_tool_arguments_raise_with_field_violations(client: AsyncMeshClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.call_tool("bad-args", a="two")
    assert caught.value.reason == "INVALID_TOOL_ARGUMENTS"
    assert caught.value.field_violations == (FieldViolation("arguments.a", "must be an integer"),)


async def test_tool_stream_without_result_is_an_internal_error(client: AsyncMeshClient) -> None:
    with pytest.raises(InternalError, match="tool 'no-result' ended without a result event"):
        await client.call_tool("no-result")


async def test_call_tool_stream_yields_events_and_cancels_on_break(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    stream = client.call_tool_stream("add", a=1, b=1)
    kinds = [event.WhichOneof("event") async for event in stream]
    assert kinds == ["progress", "log", "progress", "result"]
    assert stream.result is not None
    assert stream.result.structured == {"sum": 2, "args": {"a": 1, "b": 1}}
    assert (await stream.collect()).text == "2"  # already read: the same result
    async for event in client.call_tool_stream("hang"):
        assert event.progress.message == "started"
        break
    assert await wait_for(mesh.rec.cancelled)


async def test_progress_callback_error_cancels_the_call(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    def explode(_: common_pb2.Progress) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        await client.call_tool("hang", on_progress=explode)
    assert await wait_for(mesh.rec.cancelled)


async def test_arguments_that_are_not_json_raise_value_error(client: AsyncMeshClient) -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        await client.call_tool("add", a=object())
    with pytest.raises(ValueError, match="keys must be strings"):
        await client.call_tool("add", {1: 2})


# -- the catalog ----------------------------------------------------------------------


async def test_catalog_calls(client: AsyncMeshClient, mesh: MeshServer) -> None:
    assert [t.qualified_name for t in await client.list_tools()] == ["math/add", "time/now"]
    assert [t.name for t in await client.list_tools(plugin="time")] == ["now"]
    assert [t.name for t in await client.list_tools(query="ad")] == ["add"]
    assert (await client.get_tool("math/add")).name == "add"
    assert [a.name for a in await client.list_agents(capability="chat")] == ["echo"]
    assert mesh.rec.requests[-1].capability == "chat"
    assert (await client.get_agent("echo")).qualified_name == "bots/echo"
    assert [p.name for p in await client.list_plugins()] == ["math"]
    assert (await client.get_plugin("math")).state == mesh_pb2.PLUGIN_STATE_READY
    assert [t.root_name for t in await client.list_traces(limit=1, plugin="math")] == ["call add"]
    assert (mesh.rec.requests[-1].limit, mesh.rec.requests[-1].plugin) == (1, "math")
    assert [s.name for s in await client.get_trace("4bf92f")] == ["root"]
    with pytest.raises(NotFoundError):
        await client.get_trace("ffffff")


async def test_get_unknown_tool_is_not_found_with_reason(client: AsyncMeshClient) -> None:
    with pytest.raises(NotFoundError, match="closest: math/add") as caught:
        await client.get_tool("ad")
    assert caught.value.reason == "TARGET_NOT_FOUND"
    assert caught.value.metadata == {"closest": "math/add"}


async def test_watch_events_replays_then_cancels_on_break(
    client: AsyncMeshClient, mesh: MeshServer
) -> None:
    seen: list[int] = []
    async for event in client.watch_events(plugin="math", replay=3):
        seen.append(event.sequence)
        if len(seen) == 3:
            break
    assert seen == [1, 2, 3]
    request = mesh.rec.requests[-1]
    assert (request.plugin, request.replay, request.lifecycle_only) == ("math", 3, False)
    assert await wait_for(mesh.rec.cancelled)


async def test_watch_events_is_not_bound_by_the_default_timeout(mesh: MeshServer) -> None:
    async with AsyncMeshClient(mesh.address, timeout=WAIT) as client:
        async with client.watch_events(lifecycle_only=True, replay=1) as events:
            assert (await anext(events)).sequence == 1
        assert mesh.rec.requests[-1].lifecycle_only
        assert mesh.rec.time_remaining[-1] is None
