"""The Python client's tracing: one CLIENT span per call, its context in the metadata.

A plain in-process server (no SDK servicers, so no server spans) records the
metadata each call brings.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

import clients._tracing
from clients import (
    AsyncMeshClient,
    CallCancelledError,
    DeadlineExceededError,
    MeshClient,
    NotFoundError,
    tracing_interceptors,
)
from sidemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2, mesh_pb2_grpc, tool_pb2, tool_pb2_grpc

tracer = trace.get_tracer("tests")
Context = grpc.aio.ServicerContext[Any, Any]


class Seen:
    """The metadata of every call the server got, as lists of pairs."""

    def __init__(self) -> None:
        self.metadata: list[list[tuple[str, str]]] = []

    def record(self, context: Context) -> None:
        self.metadata.append([(k, str(v)) for k, v in context.invocation_metadata() or ()])

    def values(self, key: str, call: int = -1) -> list[str]:
        return [v for k, v in self.metadata[call] if k == key]


class Tools(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def CallTool(  # type: ignore[override]
        self, request: tool_pb2.CallToolRequest, context: Context
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        self.seen.record(context)
        if request.tool == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no tool 'missing'")
        if request.tool == "hang":
            await asyncio.sleep(3600)
        yield tool_pb2.CallToolResponse(result=tool_pb2.ToolResult())


class Agents(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def Chat(  # type: ignore[override]
        self, request_iterator: AsyncIterator[agent_pb2.ChatRequest], context: Context
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        self.seen.record(context)
        turn = 0
        async for request in request_iterator:
            if request.WhichOneof("message") == "end_turn":
                turn += 1
                yield agent_pb2.ChatResponse(turn=turn, result=agent_pb2.AgentResult())


class Mesh(mesh_pb2_grpc.MeshServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def ListTools(  # type: ignore[override]
        self, request: mesh_pb2.MeshServiceListToolsRequest, context: Context
    ) -> mesh_pb2.MeshServiceListToolsResponse:
        self.seen.record(context)
        return mesh_pb2.MeshServiceListToolsResponse()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def server(socket_dir: str) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()
    grpc_server = grpc.aio.server()
    tool_pb2_grpc.add_ToolServiceServicer_to_server(Tools(seen), grpc_server)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(Agents(seen), grpc_server)
    mesh_pb2_grpc.add_MeshServiceServicer_to_server(Mesh(seen), grpc_server)
    address = f"unix:{socket_dir}/s.sock"
    grpc_server.add_insecure_port(address)
    await grpc_server.start()
    yield address, seen
    await grpc_server.stop(None)


def traceparent(span: ReadableSpan) -> str:
    ctx = span.context
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def client_spans(spans: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.kind == SpanKind.CLIENT and s.context is not None and s.context.trace_id == trace_id
    ]


async def test_a_call_is_one_client_span_under_the_current_one(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, seen = server
    async with AsyncMeshClient(address) as client:
        with tracer.start_as_current_span("test") as root:
            await client.call_tool("add", a=1)
    trace_id = root.get_span_context().trace_id
    (span,) = client_spans(spans, trace_id)
    assert span.name == "sidemesh.v1.ToolService/CallTool"
    assert span.parent is not None and span.parent.span_id == root.get_span_context().span_id
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "sidemesh.v1.ToolService",
        "rpc.method": "CallTool",
        "server.address": address.removeprefix("unix:"),
        "network.transport": "unix",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code == StatusCode.UNSET
    assert seen.values("traceparent") == [traceparent(span)]


async def test_unary_and_bidirectional_calls_are_traced_too(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, seen = server
    async with AsyncMeshClient(address) as client:
        with tracer.start_as_current_span("test") as root:
            await client.list_tools()
            async with client.chat("echo") as chat:
                await chat.turn("one")
                await chat.turn("two")
    found = client_spans(spans, root.get_span_context().trace_id)
    assert [s.name for s in found] == [
        "sidemesh.v1.MeshService/ListTools",
        "sidemesh.v1.AgentService/Chat",  # one span for the whole conversation
    ]
    assert [(s.attributes or {})["rpc.grpc.status_code"] for s in found] == [0, 0]
    assert [seen.values("traceparent", i) for i in (0, 1)] == [[traceparent(s)] for s in found]


async def test_the_context_replaces_trace_metadata_the_caller_passed(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, seen = server
    stale = "00-11111111111111111111111111111111-2222222222222222-01"
    metadata = [("traceparent", stale), ("baggage", "old=1"), ("x-other", "kept")]
    async with AsyncMeshClient(address, metadata=metadata) as client:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            with tracer.start_as_current_span("test") as root:
                await client.call_tool("add", metadata=[("traceparent", stale)])
        finally:
            context.detach(token)
    (span,) = client_spans(spans, root.get_span_context().trace_id)
    assert seen.values("traceparent") == [traceparent(span)]  # exactly once, the new one
    assert seen.values("baggage") == ["tenant=acme"]
    assert seen.values("x-other") == ["kept"]


async def test_failures_end_the_span_with_their_status(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, _ = server
    async with AsyncMeshClient(address) as client:
        with tracer.start_as_current_span("test") as root:
            with pytest.raises(NotFoundError):
                await client.call_tool("missing")
            with pytest.raises(DeadlineExceededError):
                await client.call_tool("hang", timeout=0.05)
            stream = client.call_tool_stream("hang")
            reading = asyncio.create_task(anext(stream))
            await asyncio.sleep(0.05)
            assert stream.cancel()  # the call object is the grpc call's, not a wrapper
            with pytest.raises(CallCancelledError):
                await reading
    found = client_spans(spans, root.get_span_context().trace_id)
    assert [(s.attributes or {})["rpc.grpc.status_code"] for s in found] == [5, 4, 1]
    assert [s.status.status_code for s in found] == [StatusCode.ERROR] * 3
    assert found[0].status.description == "no tool 'missing'"
    assert found[1].status.description == "Deadline Exceeded"


async def test_tracing_false_sends_no_trace_context(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, seen = server
    async with AsyncMeshClient(address, tracing=False) as client:
        with tracer.start_as_current_span("test") as root:
            await client.call_tool("add")
    assert client_spans(spans, root.get_span_context().trace_id) == []
    assert seen.values("traceparent") == []


async def test_without_an_sdk_the_current_context_still_travels(
    server: tuple[str, Seen], spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients._tracing, "_tracer", trace.NoOpTracer())
    address, seen = server
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    async with AsyncMeshClient(address) as client:
        token = context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
        try:
            await client.call_tool("add")
        finally:
            context.detach(token)
    assert seen.values("traceparent") == ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
    assert client_spans(spans, remote.trace_id) == []


async def test_the_blocking_client_traces_under_the_calling_threads_span(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, seen = server

    def work() -> trace.Span:  # in a thread: MeshClient calls from its own loop's thread
        with MeshClient(address) as client, tracer.start_as_current_span("test") as root:
            client.call_tool("add")
        return root

    root = await asyncio.to_thread(work)
    (span,) = client_spans(spans, root.get_span_context().trace_id)
    assert span.parent is not None and span.parent.span_id == root.get_span_context().span_id
    assert seen.values("traceparent") == [traceparent(span)]


async def test_user_interceptors_run_after_tracing_and_may_short_circuit(
    server: tuple[str, Seen], spans: InMemorySpanExporter
) -> None:
    address, seen = server
    saw: list[str | None] = []

    class Cached(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(
            self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
        ) -> Any:
            metadata = client_call_details.metadata
            saw.append(metadata.get("traceparent") if metadata is not None else None)
            return mesh_pb2.MeshServiceListToolsResponse()  # answered without calling

    async with AsyncMeshClient(address, interceptors=[Cached()]) as client:
        with tracer.start_as_current_span("test") as root:
            assert await client.list_tools() == []
        await asyncio.sleep(0)  # the span of a call answered this way ends in a task
    (span,) = client_spans(spans, root.get_span_context().trace_id)
    assert saw == [traceparent(span)]
    assert (span.attributes or {})["rpc.grpc.status_code"] == 0
    assert seen.metadata == []


def test_server_attributes_of_tcp_and_unix_addresses() -> None:
    assert clients._tracing.server_attributes("127.0.0.1:50051") == {
        "server.address": "127.0.0.1",
        "server.port": 50051,
        "network.transport": "tcp",
    }
    assert clients._tracing.server_attributes("[::1]:7") == {
        "server.address": "::1",
        "server.port": 7,
        "network.transport": "tcp",
    }
    assert clients._tracing.server_attributes("/tmp/m.sock") == {
        "server.address": "/tmp/m.sock",
        "network.transport": "unix",
    }
    assert len(tracing_interceptors("/tmp/m.sock")) == 4  # one per call arity
