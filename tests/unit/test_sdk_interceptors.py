"""Interceptors around the calls a plugin serves: what they see, and what a caller sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clients import PermissionDeniedError, UnknownError
from plugins_sdk import AgentInput, CallInput, Interceptor, Plugin
from plugins_sdk.serving import StreamNext, UnaryNext
from plugins_sdk.testing import PluginHarness
from sidemesh.v1 import tool_pb2, tool_pb2_grpc

#: What the interceptors saw, in order.
seen: list[str] = []


class Audit(Interceptor):
    """Reads every call, annotates its span, counts its responses."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def unary(self, input: CallInput, next: UnaryNext) -> Any:
        seen.append(f"{self.name} {input.method}")
        return await next(input)

    async def stream(self, input: CallInput, next: StreamNext) -> AsyncGenerator[Any, None]:
        seen.append(f"{self.name} {input.service}/{input.method} {input.target}")
        assert input.span is not None and input.info.call_id
        input.span.span.set_attribute("audit.by", self.name)
        count = 0
        async for response in next(input):
            count += 1
            yield response
        seen.append(f"{self.name} sent {count}")


class DenyShout(Interceptor):
    """Rejects calls of one tool with a status of its choosing."""

    def stream(self, input: CallInput, next: StreamNext) -> AsyncGenerator[Any, None]:
        if input.target == "shout":
            raise PermissionDeniedError("shouting is not allowed here", reason="NO_SHOUTING")
        return next(input)


class Broken(Interceptor):
    """An interceptor with a bug: the caller sees a sanitized UNKNOWN, as for a tool's bug."""

    def stream(self, input: CallInput, next: StreamNext) -> AsyncGenerator[Any, None]:
        if input.target == "crash":
            raise KeyError("secret-key")
        return next(input)


app = Plugin("hooked", interceptors=[Audit("outer"), Audit("inner"), DenyShout(), Broken()])


@app.tool()
async def add(a: int, b: int) -> int:
    return a + b


@app.tool()
async def shout(text: str) -> str:
    return text.upper()


@app.tool()
async def crash() -> str:
    return "unreachable"


@app.agent()
async def echo(input: AgentInput) -> AsyncIterator[str]:
    yield "one "
    yield input.text


@pytest.fixture
async def h() -> AsyncIterator[PluginHarness]:
    seen.clear()
    async with PluginHarness(app) as harness:
        yield harness


async def test_interceptors_run_in_order_around_each_call(
    h: PluginHarness, spans: InMemorySpanExporter
) -> None:
    result = await h.client.call_tool("add", a=2, b=3)
    assert result.structured == {"result": 5}
    assert seen == [
        "outer sidemesh.v1.ToolService/CallTool add",
        "inner sidemesh.v1.ToolService/CallTool add",
        "inner sent 1",
        "outer sent 1",
    ]
    await asyncio.sleep(0.05)
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert (server.attributes or {})["audit.by"] == "inner"  # the last to set it
    assert (server.attributes or {})["sidemesh.messages.sent"] == 1


async def test_agents_and_unary_calls_are_intercepted_too(h: PluginHarness) -> None:
    reply = await h.client.invoke("echo", "two").collect()
    assert reply.text == "one two"
    assert seen[0] == "outer sidemesh.v1.AgentService/Invoke echo"
    assert seen[-1].startswith("outer sent ")
    seen.clear()
    listed = await tool_pb2_grpc.ToolServiceStub(h.channel).ListTools(tool_pb2.ListToolsRequest())
    assert [t.name for t in listed.tools] == ["add", "crash", "shout"]
    assert seen == ["outer ListTools", "inner ListTools"]


async def test_an_interceptor_rejects_a_call_with_its_status(
    h: PluginHarness, spans: InMemorySpanExporter
) -> None:
    with pytest.raises(PermissionDeniedError, match="shouting is not allowed") as info:
        await h.client.call_tool("shout", text="hi")
    assert info.value.reason == "NO_SHOUTING"
    await asyncio.sleep(0.05)
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["rpc.grpc.status_code"] == 7


async def test_a_bug_in_an_interceptor_is_a_sanitized_unknown(h: PluginHarness) -> None:
    with pytest.raises(UnknownError, match="tool 'crash' failed: KeyError") as info:
        await h.client.call_tool("crash")
    assert "secret-key" not in info.value.message
