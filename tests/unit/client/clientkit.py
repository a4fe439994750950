"""The Python client's test servers: small AgentService / ToolService / MeshService servicers
on a temporary Unix socket, served by ``grpc.aio`` on their own thread and event loop (like a
separate process: the blocking client's tests can share them)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from clients import InvalidArgumentError, NotFoundError, UnavailableError
from sidemesh.core import FieldViolation
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


def make_struct(data: dict[str, Any]) -> struct_pb2.Struct:
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
                    data=make_struct(
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
                    structured_content=make_struct({"sum": total, "args": args}),
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


async def wait_for(event: threading.Event) -> bool:
    return await asyncio.to_thread(event.wait, WAIT)
