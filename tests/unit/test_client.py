"""The Python client against real in-process gRPC servers.

Each test starts small AgentService / ToolService / MeshService servicers on a
temporary Unix socket, served by ``grpc.aio`` on its own thread and event loop
(like a separate process: the blocking client's tests can share it), and
asserts on what a client user sees.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

import clients
from clients import (
    AsyncMeshClient,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    MeshClient,
    NotFoundError,
    ResourceExhaustedError,
    SidemeshError,
    ToolCallResult,
    UnavailableError,
)
from sidemesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    mesh_pb2,
    mesh_pb2_grpc,
    tool_pb2,
    tool_pb2_grpc,
)

WAIT = 5.0  # seconds to wait for something that should happen at once

# -- test servicers -----------------------------------------------------------


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    json_format.ParseDict(data, struct)
    return struct


class Recorder:
    """What the servers saw, readable from any thread."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.chat_half_closed = threading.Event()
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []

    def see(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.requests.append(request)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        self.time_remaining.append(context.time_remaining())

    async def hang(self) -> None:
        """Works until the call is cancelled."""
        await asyncio.sleep(3600)


def records_cancellation(handler: Callable[..., AsyncIterator[Any]]) -> Any:
    """Wraps a streaming handler to record when its call is cancelled.

    grpc cancels a streaming handler wherever it is suspended: inside it
    (``CancelledError``) or at a ``yield`` while sending (the generator is then
    closed with ``GeneratorExit``).
    """

    async def wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for response in handler(self, request, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            self.rec.cancelled.set()
            raise

    return wrapper


def _result(
    status: int = agent_pb2.AGENT_RESULT_STATUS_COMPLETED, message: str = ""
) -> agent_pb2.AgentResult:
    return agent_pb2.AgentResult(status=status, message=message)  # type: ignore[arg-type]


class Agents(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    @records_cancellation
    async def Invoke(  # type: ignore[override]
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeResponse]:
        self.rec.see(request, context)
        Event = agent_pb2.InvokeResponse
        name = request.agent or f"capability:{request.capability}"
        if name in ("echo", "capability:chat"):
            yield Event(progress=common_pb2.Progress(progress=1, total=2, message="thinking"))
            yield Event(text_delta=agent_pb2.TextDelta(text="you said: "))
            yield Event(text_delta=agent_pb2.TextDelta(text=request.input.text))
            yield Event(
                output=agent_pb2.StructuredOutput(
                    data=_struct(
                        {
                            "data": json_format.MessageToDict(request.input.data),
                            "options": json_format.MessageToDict(request.options),
                            "session": request.session_id,
                        }
                    )
                )
            )
            yield Event(result=_result())
        elif name == "big":
            yield Event(text_delta=agent_pb2.TextDelta(text="x" * 8192))
            yield Event(result=_result())
        elif name == "no-result":
            yield Event(text_delta=agent_pb2.TextDelta(text="partial"))
        elif name == "after-result":
            yield Event(result=_result())
            yield Event(text_delta=agent_pb2.TextDelta(text="late"))
        elif name == "failing-task":
            yield Event(result=_result(agent_pb2.AGENT_RESULT_STATUS_FAILED, "no answer"))
        elif name == "reject":
            await InvalidArgumentError(
                "input.text must not be empty",
                reason="INVALID_INPUT",
                field_violations=[FieldViolation("input.text", "must not be empty")],
            ).abort(context)
        elif name == "midway":
            yield Event(text_delta=agent_pb2.TextDelta(text="starting"))
            await UnavailableError("the sidecar died", reason="SIDECAR_EXITED").abort(context)
        elif name == "hang":
            yield Event(text_delta=agent_pb2.TextDelta(text="working"))
            await self.rec.hang()
        else:
            await NotFoundError(f"no agent named {name!r}").abort(context)

    @records_cancellation
    async def Chat(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[agent_pb2.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        Event = agent_pb2.ChatResponse
        start: agent_pb2.ChatStart | None = None
        turn, running, texts = 0, False, []
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if start is None:
                if kind != "start":
                    await InvalidArgumentError("the first message must be start").abort(context)
                start = request.start
                self.rec.see(request, context)
                continue
            if kind == "input":
                if not running:
                    turn, running, texts = turn + 1, True, []
                texts.append(request.input.text)
            elif kind == "end_turn":
                if start.agent == "chat-hang":
                    yield Event(turn=turn, text_delta=agent_pb2.TextDelta(text="working"))
                    await self.rec.hang()
                if start.agent == "chat-drop":
                    return  # ends OK with the turn's result never sent
                yield Event(turn=turn, text_delta=agent_pb2.TextDelta(text=" + ".join(texts)))
                yield Event(turn=turn, result=_result())
                running = False
            elif kind == "cancel_turn":
                yield Event(turn=turn, result=_result(agent_pb2.AGENT_RESULT_STATUS_CANCELLED))
                running = False
        self.rec.chat_half_closed.set()


class Tools(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    @records_cancellation
    async def CallTool(  # type: ignore[override]
        self, request: tool_pb2.CallToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        self.rec.see(request, context)
        Event = tool_pb2.CallToolResponse
        args = json_format.MessageToDict(request.arguments)
        if request.tool == "add":
            total = args["a"] + args["b"]
            yield Event(progress=common_pb2.Progress(progress=1, total=2, message="read a"))
            yield Event(log=common_pb2.LogRecord(level=common_pb2.LOG_LEVEL_INFO, message="adding"))
            yield Event(progress=common_pb2.Progress(progress=2, total=2, message="read b"))
            yield Event(
                result=tool_pb2.ToolResult(
                    content=[common_pb2.Content(text=f"{total:g}")],
                    structured_content=_struct({"sum": total, "args": args}),
                )
            )
        elif request.tool == "oops":
            yield Event(
                result=tool_pb2.ToolResult(
                    content=[common_pb2.Content(text="unknown timezone"), common_pb2.Content()],
                    is_error=True,
                )
            )
        elif request.tool == "no-result":
            yield Event(progress=common_pb2.Progress(progress=1))
        elif request.tool == "bad-args":
            await InvalidArgumentError(
                "arguments do not match the tool's input schema",
                reason="INVALID_TOOL_ARGUMENTS",
                field_violations=[FieldViolation("arguments.a", "must be an integer")],
            ).abort(context)
        elif request.tool == "hang":
            yield Event(progress=common_pb2.Progress(progress=0, message="started"))
            await self.rec.hang()
        else:
            await NotFoundError(f"no tool named {request.tool!r}").abort(context)


TOOLS = [
    tool_pb2.ToolDescriptor(name="add", plugin="math", qualified_name="math/add"),
    tool_pb2.ToolDescriptor(name="now", plugin="time", qualified_name="time/now"),
]
AGENTS = [agent_pb2.AgentDescriptor(name="echo", plugin="bots", qualified_name="bots/echo")]
PLUGINS = [mesh_pb2.PluginStatus(name="math", state=mesh_pb2.PLUGIN_STATE_READY)]
TRACES = [
    mesh_pb2.TraceSummary(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", root_name="call add"),
    mesh_pb2.TraceSummary(trace_id="0af7651916cd43dd8448eb211c80319c", root_name="invoke"),
]


class Mesh(mesh_pb2_grpc.MeshServiceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def ListTools(  # type: ignore[override]
        self, request: mesh_pb2.MeshServiceListToolsRequest, context: Any
    ) -> mesh_pb2.MeshServiceListToolsResponse:
        self.rec.see(request, context)
        tools = [t for t in TOOLS if request.plugin in ("", t.plugin) and request.query in t.name]
        return mesh_pb2.MeshServiceListToolsResponse(tools=tools)

    async def GetTool(  # type: ignore[override]
        self, request: mesh_pb2.GetToolRequest, context: Any
    ) -> mesh_pb2.GetToolResponse:
        for tool in TOOLS:
            if request.name in (tool.name, tool.qualified_name):
                return mesh_pb2.GetToolResponse(tool=tool)
        await NotFoundError(
            f"no tool named {request.name!r}; closest: math/add",
            reason="TARGET_NOT_FOUND",
            metadata={"closest": "math/add"},
        ).abort(context)

    async def ListAgents(  # type: ignore[override]
        self, request: mesh_pb2.ListAgentsRequest, context: Any
    ) -> mesh_pb2.ListAgentsResponse:
        self.rec.see(request, context)
        return mesh_pb2.ListAgentsResponse(agents=AGENTS)

    async def GetAgent(  # type: ignore[override]
        self, request: mesh_pb2.GetAgentRequest, context: Any
    ) -> mesh_pb2.GetAgentResponse:
        return mesh_pb2.GetAgentResponse(agent=AGENTS[0])

    async def ListPlugins(  # type: ignore[override]
        self, request: mesh_pb2.ListPluginsRequest, context: Any
    ) -> mesh_pb2.ListPluginsResponse:
        return mesh_pb2.ListPluginsResponse(plugins=PLUGINS)

    async def GetPlugin(  # type: ignore[override]
        self, request: mesh_pb2.GetPluginRequest, context: Any
    ) -> mesh_pb2.GetPluginResponse:
        return mesh_pb2.GetPluginResponse(plugin=PLUGINS[0])

    async def ListTraces(  # type: ignore[override]
        self, request: mesh_pb2.ListTracesRequest, context: Any
    ) -> mesh_pb2.ListTracesResponse:
        self.rec.see(request, context)
        return mesh_pb2.ListTracesResponse(traces=TRACES[: request.limit or None])

    async def GetTrace(  # type: ignore[override]
        self, request: mesh_pb2.GetTraceRequest, context: Any
    ) -> mesh_pb2.GetTraceResponse:
        if not TRACES[0].trace_id.startswith(request.trace_id):
            await NotFoundError(f"no trace {request.trace_id!r}").abort(context)
        return mesh_pb2.GetTraceResponse(spans=[mesh_pb2.TraceSpan(name="root")])

    @records_cancellation
    async def WatchEvents(  # type: ignore[override]
        self, request: mesh_pb2.WatchEventsRequest, context: Any
    ) -> AsyncIterator[mesh_pb2.WatchEventsResponse]:
        self.rec.see(request, context)
        for sequence in range(1, request.replay + 1):
            yield mesh_pb2.WatchEventsResponse(sequence=sequence, plugin=request.plugin)
        await self.rec.hang()


class MeshServer:
    """The servicers served on a Unix socket by their own thread and event loop."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
        self.address = f"unix:{self.directory}/mesh.sock"
        self.rec = Recorder()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(WAIT)

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(Agents(self.rec), self._server)
        tool_pb2_grpc.add_ToolServiceServicer_to_server(Tools(self.rec), self._server)
        mesh_pb2_grpc.add_MeshServiceServicer_to_server(Mesh(self.rec), self._server)
        self._server.add_insecure_port(self.address)
        await self._server.start()

    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    def stop(self) -> None:
        try:
            if self._server is not None:
                self._run(self._server.stop(None))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(WAIT)
            self._loop.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def mesh() -> Iterator[MeshServer]:
    server = MeshServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def client(mesh: MeshServer) -> AsyncIterator[AsyncMeshClient]:
    async with AsyncMeshClient(mesh.address, metadata=[("x-client", "tests")]) as mesh_client:
        yield mesh_client


async def wait_for(event: threading.Event) -> bool:
    return await asyncio.to_thread(event.wait, WAIT)


# -- the package ----------------------------------------------------------------


def test_public_names_are_pinned() -> None:
    assert sorted(clients.__all__) == sorted(
        [
            *("AsyncMeshClient", "MeshClient", "AgentStream", "AgentReply", "ChatSession"),
            *("ToolCallResult", "ToolCallStream", "ServerStream"),
            *("SyncAgentStream", "SyncChatSession", "SyncStream", "SyncToolCallStream"),
            *("DEFAULT_TCP_ADDRESS", "ERROR_DOMAIN", "FieldViolation", "SidemeshError"),
            *("from_status", "normalize_address", "unix_socket_path"),
            *("struct_to_dict", "to_struct", "tracing_interceptors", "server_options"),
            "run_loop",
            *("AbortedError", "AlreadyExistsError", "CallCancelledError", "DataLossError"),
            *("DeadlineExceededError", "FailedPreconditionError", "InternalError"),
            *("InvalidArgumentError", "NotFoundError", "OutOfRangeError"),
            *("PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError"),
            *("UnavailableError", "UnimplementedError", "UnknownError"),
        ]
    )
    for name in clients.__all__:
        assert getattr(clients, name) is not None


def test_address_defaults_to_env_then_default_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDEMESH_ADDRESS", raising=False)
    assert AsyncMeshClient().address == clients.DEFAULT_TCP_ADDRESS
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
        structured_content=_struct({"n": 3, "ratio": 0.5, "items": [1, 2.5]}),
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
    explicit = agent_pb2.AgentInput(text="t", data=_struct({"k": "v"}))
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
