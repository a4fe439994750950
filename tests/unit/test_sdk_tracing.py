"""plugins_sdk tracing: SERVER spans per call, callbacks and plugin spans in the same trace.

Plugins are served by ``PluginHarness``; the session's in-memory exporter
(``conftest.py``) collects the spans of the test client, the plugin and its
callbacks, all in this process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clients import CallCancelledError, DeadlineExceededError, NotFoundError, UnknownError
from plugins_sdk import AgentContext, AgentInput, Plugin, Result, ToolContext, ToolError
from plugins_sdk.testing import PluginHarness
from sidecars._logging import log_handler
from sidemesh.v1 import tool_pb2, tool_pb2_grpc

tracer = trace.get_tracer("tests")
WAIT = 5.0

tools = Plugin("tools-t", version="1.2.3")
agents = Plugin("agents-t", version="0.4.0")
#: What handlers observed, for the assertions.
seen: dict[str, Any] = {}


@tools.tool()
async def add(a: int, b: int) -> int:
    return a + b


@tools.tool()
def current_span_in_a_thread() -> str:
    return f"{trace.get_current_span().get_span_context().span_id:016x}"


@tools.tool()
async def work(ctx: ToolContext) -> str:
    ctx.logger.info("starting")
    with ctx.tracer.start_as_current_span("parse input"):
        ctx.logger.info("parsing")
    return "done"


@tools.tool()
async def refuse() -> str:
    raise ToolError("no such city")


@tools.tool()
async def buggy() -> str:
    raise ValueError("secret-token-123")


@tools.tool()
async def absent() -> str:
    raise NotFoundError("the record is gone")


@tools.tool()
async def whoami() -> str:
    span = trace.get_current_span().get_span_context()
    return f"{span.trace_id:032x}-{span.span_id:016x}"


@tools.tool()
async def tenant() -> str:
    return str(baggage.get_baggage("tenant"))


@tools.tool()
async def hang(ctx: ToolContext) -> str:
    await asyncio.sleep(3600)
    return "never"


@agents.agent()
async def planner(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    yield "adding "
    result = await ctx.call_tool("tools-t/add", a=1, b=2)
    yield str(result.structured["result"])


@agents.agent()
async def asker(input: AgentInput, ctx: AgentContext) -> str:
    return (await ctx.call_tool("tools-t/whoami")).text


@agents.agent()
async def relay(input: AgentInput, ctx: AgentContext) -> str:
    return (await ctx.call_tool("tools-t/tenant")).text


@agents.agent()
async def quitter(input: AgentInput, ctx: AgentContext) -> AsyncIterator[Any]:
    yield Result(status="failed", message="gave up")


# -- helpers ------------------------------------------------------------------------


async def trace_spans(spans: InMemorySpanExporter, trace_id: int, count: int) -> list[ReadableSpan]:
    """The trace's spans once ``count`` have ended (the server's end after the client's)."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [
            s
            for s in spans.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda s: s.start_time or 0)
        await asyncio.sleep(0.01)


def one(found: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    (span,) = [s for s in found if s.name == name and s.kind == kind]
    return span


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan | trace.Span) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


CALL_TOOL = "sidemesh.v1.ToolService/CallTool"
INVOKE = "sidemesh.v1.AgentService/Invoke"


@pytest.fixture
async def tools_harness() -> AsyncIterator[PluginHarness]:
    async with PluginHarness(tools) as harness:
        yield harness


@pytest.fixture
def plugin_log() -> Iterator[io.StringIO]:
    """The ``tools-t`` loggers' lines, formatted as the sidecar formats them."""
    stream = io.StringIO()
    handler = log_handler(stream)
    logger = logging.getLogger("tools-t")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- tests ------------------------------------------------------------------------------


async def test_a_tool_call_is_a_server_span_under_the_client_span(
    tools_harness: PluginHarness, spans: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("test") as root:
        await tools_harness.client.call_tool("tools-t/add", a=1, b=2)
    found = await trace_spans(spans, root.get_span_context().trace_id, 3)
    client = one(found, CALL_TOOL, SpanKind.CLIENT)
    server = one(found, CALL_TOOL, SpanKind.SERVER)
    assert parent_of(client) == span_id(root)
    assert parent_of(server) == span_id(client)
    assert server.parent is not None and server.parent.is_remote
    call_id = attrs(server).pop("sidemesh.call_id")
    assert isinstance(call_id, str) and call_id
    assert attrs(server) == {
        "rpc.system": "grpc",
        "rpc.service": "sidemesh.v1.ToolService",
        "rpc.method": "CallTool",
        "rpc.grpc.status_code": 0,
        "sidemesh.plugin": "tools-t",
        "sidemesh.plugin.version": "1.2.3",
        "sidemesh.target": "add",  # the plugin-local name, not what the caller wrote
        "sidemesh.call_id": call_id,
        "sidemesh.tool.is_error": False,
        "sidemesh.messages.sent": 1,
    }
    assert server.status.status_code == StatusCode.UNSET
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "sidemesh.plugins_sdk"


async def test_a_tools_own_spans_and_log_lines_join_the_call(
    tools_harness: PluginHarness, spans: InMemorySpanExporter, plugin_log: io.StringIO
) -> None:
    logging.getLogger("tools-t.outside").info("not in a call")
    with tracer.start_as_current_span("test") as root:
        await tools_harness.client.call_tool("work")
        thread_span = (await tools_harness.client.call_tool("current_span_in_a_thread")).text
    trace_id = root.get_span_context().trace_id
    found = await trace_spans(spans, trace_id, 6)
    server, sync_server = [s for s in found if s.name == CALL_TOOL and s.kind == SpanKind.SERVER]
    inner = one(found, "parse input", SpanKind.INTERNAL)
    assert parent_of(inner) == span_id(server)
    assert inner.instrumentation_scope is not None
    assert inner.instrumentation_scope.name == "tools-t"
    assert thread_span == f"{span_id(sync_server):016x}"  # a sync tool's thread has it too
    assert (attrs(server)["sidemesh.messages.sent"], attrs(sync_server)["sidemesh.target"]) == (
        1,
        "current_span_in_a_thread",
    )
    ids = f"trace_id={trace_id:032x}"
    assert plugin_log.getvalue().splitlines() == [
        "INFO tools-t.outside: not in a call",
        f"INFO tools-t.work: starting {ids} span_id={span_id(server):016x}",
        f"INFO tools-t.work: parsing {ids} span_id={span_id(inner):016x}",
    ]


async def test_an_agents_callback_is_one_trace_from_client_to_tool(
    spans: InMemorySpanExporter,
) -> None:
    async with PluginHarness(agents, mesh_apps=[tools]) as harness:
        with tracer.start_as_current_span("test") as root:
            reply = await harness.client.invoke("planner", "1 + 2").collect()
        assert reply.text == "adding 3"
        found = await trace_spans(spans, root.get_span_context().trace_id, 5)
    client = one(found, INVOKE, SpanKind.CLIENT)
    agent = one(found, INVOKE, SpanKind.SERVER)
    callback = one(found, CALL_TOOL, SpanKind.CLIENT)
    tool = one(found, CALL_TOOL, SpanKind.SERVER)
    assert [parent_of(s) for s in (client, agent, callback, tool)] == [
        span_id(root),
        span_id(client),
        span_id(agent),
        span_id(callback),
    ]
    assert (attrs(agent)["sidemesh.plugin"], attrs(agent)["sidemesh.target"]) == (
        "agents-t",
        "planner",
    )
    assert attrs(agent)["sidemesh.messages.sent"] == 5  # 2 text deltas, started/finished, result
    assert "sidemesh.caller" not in attrs(agent)
    assert (attrs(tool)["sidemesh.plugin"], attrs(tool)["sidemesh.caller"]) == (
        "tools-t",
        "agents-t",
    )


async def test_a_chat_is_one_server_span_and_its_turns_callbacks_are_children(
    spans: InMemorySpanExporter,
) -> None:
    async with PluginHarness(agents, mesh_apps=[tools]) as harness:
        with tracer.start_as_current_span("test") as root:
            async with harness.client.chat("planner") as chat:
                assert (await chat.turn("one")).text == "adding 3"
                assert (await chat.turn("two")).text == "adding 3"
        found = await trace_spans(spans, root.get_span_context().trace_id, 7)
    chat_span = one(found, "sidemesh.v1.AgentService/Chat", SpanKind.SERVER)
    callbacks = [s for s in found if s.name == CALL_TOOL and s.kind == SpanKind.CLIENT]
    assert [parent_of(s) for s in callbacks] == [span_id(chat_span)] * 2
    assert attrs(chat_span)["sidemesh.target"] == "planner"
    assert attrs(chat_span)["sidemesh.messages.sent"] == 10
    assert chat_span.status.status_code == StatusCode.UNSET


async def test_a_tool_error_result_is_not_a_span_error_but_a_failed_turn_is(
    tools_harness: PluginHarness, spans: InMemorySpanExporter
) -> None:
    async with PluginHarness(agents) as agents_harness:
        with tracer.start_as_current_span("test") as root:
            assert (await tools_harness.client.call_tool("tools-t/refuse")).is_error
            assert (await agents_harness.client.invoke("quitter").collect()).failed
        found = await trace_spans(spans, root.get_span_context().trace_id, 4)
    tool = one(found, CALL_TOOL, SpanKind.SERVER)
    assert tool.status.status_code == StatusCode.UNSET
    assert attrs(tool)["sidemesh.tool.is_error"] is True
    agent = one(found, INVOKE, SpanKind.SERVER)
    assert agent.status.status_code == StatusCode.ERROR
    assert agent.status.description == "gave up"
    assert attrs(agent)["rpc.grpc.status_code"] == 0


async def test_exceptions_are_recorded_with_the_code_they_end_the_call_with(
    tools_harness: PluginHarness, spans: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("test") as root:
        with pytest.raises(UnknownError):
            await tools_harness.client.call_tool("buggy")
        with pytest.raises(NotFoundError):
            await tools_harness.client.call_tool("absent")
        with pytest.raises(NotFoundError):
            await tools_harness.client.call_tool("no-such-tool")
    found = await trace_spans(spans, root.get_span_context().trace_id, 6)
    servers = [s for s in found if s.kind == SpanKind.SERVER]
    assert [attrs(s)["rpc.grpc.status_code"] for s in servers] == [2, 5, 5]
    assert [s.status.status_code for s in servers] == [StatusCode.ERROR] * 3
    assert [s.events[0].name for s in servers] == ["exception"] * 3
    assert [(s.events[0].attributes or {})["exception.type"] for s in servers] == [
        "ValueError",
        "sidemesh.core.NotFoundError",
        "sidemesh.core.NotFoundError",
    ]
    assert servers[0].status.description == "ValueError: secret-token-123"
    assert attrs(servers[2])["sidemesh.target"] == "no-such-tool"


async def test_cancellation_and_deadline_end_the_server_span_with_their_code(
    tools_harness: PluginHarness, spans: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("test") as root:
        with pytest.raises(DeadlineExceededError):
            await tools_harness.client.call_tool("hang", timeout=0.1)
        stream = tools_harness.client.call_tool_stream("hang")
        reading = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.1)
        stream.cancel()
        with pytest.raises(CallCancelledError):
            await reading
    found = await trace_spans(spans, root.get_span_context().trace_id, 5)
    servers = [s for s in found if s.kind == SpanKind.SERVER]
    assert [attrs(s)["rpc.grpc.status_code"] for s in servers] == [4, 1]
    assert [s.status.status_code for s in servers] == [StatusCode.ERROR] * 2
    assert [attrs(s)["sidemesh.messages.sent"] for s in servers] == [0, 0]


async def test_list_tools_is_traced_from_raw_metadata_and_plugin_service_is_not(
    tools_harness: PluginHarness, spans: InMemorySpanExporter
) -> None:
    trace_id = 0x5B8AA5A2D2C872E8321CF37308D69DF2
    parent = "00-5b8aa5a2d2c872e8321cf37308d69df2-051581bf3cb55c13-01"
    stub = tool_pb2_grpc.ToolServiceStub(tools_harness.channel)  # a channel without tracing
    await stub.ListTools(tool_pb2.ListToolsRequest(), metadata=[("traceparent", parent)])
    await tools_harness.configure({})
    (server,) = await trace_spans(spans, trace_id, 1)
    assert server.name == "sidemesh.v1.ToolService/ListTools"
    assert parent_of(server) == 0x051581BF3CB55C13
    assert attrs(server)["sidemesh.messages.sent"] == 1
    await asyncio.sleep(0.05)
    assert [s.name for s in spans.get_finished_spans() if "PluginService" in s.name] == []


async def test_callbacks_without_an_sdk_carry_the_callers_context(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clients._tracing
    import plugins_sdk._tracing

    monkeypatch.setattr(clients._tracing, "_tracer", trace.NoOpTracer())
    monkeypatch.setattr(plugins_sdk._tracing, "_tracer", trace.NoOpTracer())
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with PluginHarness(agents, mesh_apps=[tools]) as harness:
        reply = await harness.client.invoke("asker", metadata=[("traceparent", parent)]).collect()
    # Client, agent, callback, tool: none records, and the tool runs in the caller's context.
    assert reply.text == "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
    assert spans.get_finished_spans() == ()


async def test_the_callers_baggage_reaches_the_plugin_and_its_callbacks() -> None:
    async with PluginHarness(agents, mesh_apps=[tools]) as harness:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            reply = await harness.client.invoke("relay").collect()
        finally:
            context.detach(token)
    assert reply.text == "acme"
