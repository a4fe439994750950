"""The MCP bridge in-process, against a small MCP server made with the official SDK.

The server (``SERVER`` below, run as a child over stdio) speaks the 2026
stateless protocol, which the bridge's automatic mode picks: its tool list
changes arrive on a ``subscriptions/listen`` stream, and cancellation reaches
it as ``notifications/cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clients import (
    AsyncMeshClient,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from sidecars.mcp._link import ServerLink, StartupError
from sidecars.mcp._main import _Bridge
from sidecars.mcp._spec import ServerSpec
from sidecars.mcp._watchers import Watchers
from sidemesh.v1 import mcp_pb2, mcp_pb2_grpc, plugin_pb2, plugin_pb2_grpc

SERVER = '''
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("fixture", version="1.2.3")


@server.tool()
async def add_tool(name: str, ctx: Context) -> str:
    """Adds a tool, and says the tool list changed."""
    server.add_tool(lambda: "hi", name=name)
    await ctx.notify_tools_changed()
    return "added"


@server.tool()
async def wait(steps: int, ctx: Context) -> str:
    """Reports progress every 0.05 s; says on stderr when it is cancelled."""
    try:
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}")
            await anyio.sleep(0.05)
    except anyio.get_cancelled_exc_class():
        print("wait was cancelled", file=sys.stderr, flush=True)
        raise
    return "waited"


@server.tool()
def crash() -> str:
    """Exits at once, as a crashing server does."""
    sys.stdout.flush()
    import os
    os._exit(1)


print("fixture server starting", file=sys.stderr, flush=True)
if len(sys.argv) > 1:  # a port: streamable HTTP on 127.0.0.1
    anyio.run(lambda: server.run_streamable_http_async(port=int(sys.argv[1])))
else:
    anyio.run(server.run_stdio_async)
'''


@pytest.fixture
def server_script(tmp_path: Path) -> Path:
    path = tmp_path / "fixture_server.py"
    path.write_text(SERVER)
    return path


@pytest.fixture
async def bridge(server_script: Path, tmp_path: Path) -> AsyncIterator[tuple[_Bridge, str]]:
    """The bridge's services on a temporary socket, with the fixture server behind them."""
    spec = ServerSpec(command=sys.executable, args=(str(server_script),), request_timeout=10)
    running = _Bridge("fixture", spec)
    await running.link.start()
    server = running.build_server()
    address = f"unix:{tmp_path / 'bridge.sock'}"
    server.add_insecure_port(address)
    await server.start()
    try:
        yield running, address
    finally:
        await running.request_stop(0)
        await server.stop(None)
        await running.link.close()


async def test_describe_names_the_plugin_and_versions_it_as_the_server(
    bridge: tuple[_Bridge, str],
) -> None:
    _, address = bridge
    async with grpc.aio.insecure_channel(address) as channel:
        described = await plugin_pb2_grpc.PluginServiceStub(channel).Describe(
            plugin_pb2.DescribeRequest()
        )
    assert described.plugin.name == "fixture"
    assert described.plugin.version == "1.2.3"
    assert described.plugin.runtime == "sidemesh-mcp-bridge/0.1.0"
    assert [t.name for t in described.tools] == ["add_tool", "crash", "wait"]
    assert described.mcp_server.protocol_version == "2026-07-28"
    assert described.mcp_server.capabilities.tools_list_changed


async def test_progress_arrives_in_order_and_the_call_is_traced(
    bridge: tuple[_Bridge, str], span_exporter: InMemorySpanExporter
) -> None:
    _, address = bridge
    span_exporter.clear()
    async with AsyncMeshClient(address, tracing=False) as client:
        events = [e async for e in client.call_tool_stream("fixture/wait", steps=4)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 4 + ["result"]
    assert [(e.progress.progress, e.progress.message) for e in events[:4]] == [
        (i, f"step {i}") for i in range(1, 5)
    ]
    assert events[-1].result.content[0].text == "waited"
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    server = spans["sidemesh.v1.ToolService/CallTool"]
    assert server.attributes is not None
    assert server.attributes["sidemesh.plugin"] == "fixture"
    assert server.attributes["sidemesh.target"] == "wait"
    assert server.attributes["sidemesh.messages.sent"] == 5
    # The SDK's own client span of the MCP request is a child of the call's span.
    mcp_span = spans["MCP send tools/call wait"]
    assert mcp_span.parent is not None
    assert mcp_span.parent.span_id == server.context.span_id


async def test_arguments_are_checked_and_unknown_tools_are_not_found(
    bridge: tuple[_Bridge, str],
) -> None:
    _, address = bridge
    async with AsyncMeshClient(address, tracing=False) as client:
        with pytest.raises(InvalidArgumentError) as bad:
            await client.call_tool("wait", steps="many")
        with pytest.raises(NotFoundError, match="its tools: add_tool, crash, wait"):
            await client.call_tool("nope")
    assert [v.field for v in bad.value.field_violations] == ["arguments.steps"]


async def test_cancelling_a_call_cancels_the_mcp_request_on_the_server(
    bridge: tuple[_Bridge, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, address = bridge
    caplog.set_level(logging.INFO)
    async with AsyncMeshClient(address, tracing=False) as client:
        stream = client.call_tool_stream("wait", steps=200)
        events = aiter(stream)
        assert (await anext(events)).HasField("progress")
        stream.cancel()
        deadline = time.monotonic() + 5
        while "wait was cancelled" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert "sent MCP cancellation of request" in caplog.text
    assert "mcp-server" in caplog.text and "wait was cancelled" in caplog.text


async def test_the_deadline_is_the_mcp_request_timeout(
    bridge: tuple[_Bridge, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, address = bridge
    caplog.set_level(logging.INFO)
    async with AsyncMeshClient(address, tracing=False) as client:
        stream = client.call_tool_stream("wait", steps=200, timeout=1.5)
        # The server is running the tool (on a loaded machine it may not be at once).
        assert (await anext(aiter(stream))).HasField("progress")
        with pytest.raises(DeadlineExceededError):
            async for _ in stream:
                pass
        deadline = time.monotonic() + 5
        while "sent MCP cancellation" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    # What the bridge owns: at the deadline it sends MCP's notifications/cancelled for the
    # request. (Whether the server's handler then stops is the server's: the SDK-made one
    # occasionally misses a cancellation that lands while it reports progress.)
    assert "sent MCP cancellation of request" in caplog.text


async def test_a_tool_list_change_is_listed_again_before_watchers_hear_of_it(
    bridge: tuple[_Bridge, str],
) -> None:
    running, address = bridge
    async with grpc.aio.insecure_channel(address) as channel:
        watch = mcp_pb2_grpc.McpServiceStub(channel).Watch(mcp_pb2.WatchRequest())
        async with AsyncMeshClient(address, tracing=False) as client:
            # The listen stream opens with the session; give it a moment to be acknowledged.
            await asyncio.sleep(0.3)
            assert (await client.call_tool("add_tool", name="greet")).text == "added"
            async with asyncio.timeout(10):
                event = await anext(aiter(watch))
            assert event.HasField("tools_list_changed")
            # By then the bridge's catalog (what Describe shows) has the new tool.
            assert "greet" in [d.name for d in running.link.catalog.descriptors()]
            assert (await client.call_tool("greet")).text == "hi"
        watch.cancel()


async def test_a_crashed_server_is_restarted(bridge: tuple[_Bridge, str]) -> None:
    running, address = bridge
    # 30 s: time enough for a restart on a loaded machine
    async with AsyncMeshClient(address, tracing=False, timeout=30) as client:
        with pytest.raises(UnavailableError, match="exited or closed its connection"):
            await client.call_tool("crash")
        assert (await client.call_tool("wait", steps=1)).text == "waited"
    assert running.link.info.version == "1.2.3"


async def test_a_missing_command_fails_at_start_with_its_name() -> None:
    link = ServerLink(ServerSpec(command="no-such-mcp-server"), "x", Watchers())
    with pytest.raises(StartupError, match="'no-such-mcp-server' is not on its PATH"):
        await link.start()


async def test_a_server_that_never_answers_fails_at_start_within_its_timeout() -> None:
    link = ServerLink(
        ServerSpec(command="sleep", args=("30",), request_timeout=0.5), "x", Watchers()
    )
    started = time.monotonic()
    with pytest.raises(StartupError, match=r"did not answer its first request within 0.5s"):
        await link.start()
    assert time.monotonic() - started < 5


async def test_a_server_that_exits_at_once_says_so(tmp_path: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text("import sys; print('bad flag --frobnicate', file=sys.stderr); sys.exit(2)")
    link = ServerLink(ServerSpec(command=sys.executable, args=(str(script),)), "x", Watchers())
    with pytest.raises(StartupError, match="exited or closed its output before it answered"):
        await link.start()


async def test_a_streamable_http_server_on_loopback(server_script: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = ServerSpec(
        command=sys.executable, args=(str(server_script), str(port)),
        transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", request_timeout=10,
    )  # fmt: skip
    link = ServerLink(spec, "fixture", Watchers())
    await link.start()
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    try:
        result = await link.request(
            "tool 'wait'",
            lambda client, seconds: client.call_tool(
                "wait", {"steps": 3}, read_timeout_seconds=seconds, progress_callback=on_progress
            ),
            10,
        )
    finally:
        await link.close()
    assert result.content[0].text == "waited"  # type: ignore[union-attr]
    assert progress == [1, 2, 3]
    assert link.info.name == "fixture"
