"""MCP servers nobody here wrote, bridged into a real sandboxed mesh; the mesh as an MCP server.

The servers: ``mcp-server-time`` (PyPI, the 2026 stateless protocol) and
``@modelcontextprotocol/server-everything`` (npm, run by node, the 2025
handshake), as the example plugins ``mcp-time`` and ``mcp-everything``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from meshproc import EXAMPLE_PLUGINS, ROOT, Mesh, process_tree, processes_with, wait_until

from clients import (
    AsyncMeshClient,
    CallCancelledError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from sidemesh.v1 import mcp_pb2, mcp_pb2_grpc

pytestmark = pytest.mark.integration

EVERYTHING_DIR = EXAMPLE_PLUGINS / "mcp-everything"
# `make setup` (npm ci) installs it; a missing one must fail these tests, not skip them.
_INSTALLED = EVERYTHING_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything"
assert _INSTALLED.is_dir(), "server-everything is missing: run `make setup` (npm ci installs it)"

TEXT_URI = "demo://resource/dynamic/text/1"
BLOB_URI = "demo://resource/dynamic/blob/1"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One sandboxed mesh with the example plugins: two MCP servers, tools-demo, assistant."""
    m = Mesh(tmp_path_factory.mktemp("mcp"), plugin_dirs=[str(EXAMPLE_PLUGINS)])
    try:
        m.start(ready=["mcp-time", "mcp-everything", "assistant", "tools-demo"])
        yield m
        assert m.stop() == 0
        assert m.sidecars() == [], "an MCP server outlived the mesh"
    finally:
        m.cleanup()


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[AsyncMeshClient]:
    async with AsyncMeshClient(mesh.address, timeout=20) as c:
        yield c


@pytest.fixture
async def mcp(mesh: Mesh) -> AsyncIterator[mcp_pb2_grpc.McpServiceStub]:
    """McpService of the orchestrator, which routes by the request's ``server``."""
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield mcp_pb2_grpc.McpServiceStub(channel)


def server_pids(mesh: Mesh, plugin: str, marker: str) -> list[int]:
    """Pids of the plugin's MCP server: the sidecar's descendants whose command has ``marker``."""
    pid = mesh.plugin(plugin).replicas[0].pid
    found = []
    for child in process_tree(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"sidecars.mcp" not in cmdline:
            found.append(child)
    return found


# -- mcp-server-time: the 2026 stateless protocol ------------------------------------------


async def test_time_server_tools_are_mesh_tools(
    client: AsyncMeshClient, mcp: mcp_pb2_grpc.McpServiceStub
) -> None:
    tools = {t.name: t for t in await client.list_tools(plugin="mcp-time")}
    assert set(tools) == {"get_current_time", "convert_time"}
    assert tools["get_current_time"].qualified_name == "mcp-time/get_current_time"
    assert "timezone" in tools["get_current_time"].input_schema["properties"]
    assert tools["get_current_time"].annotations.read_only
    info = (await mcp.GetServerInfo(mcp_pb2.GetServerInfoRequest(server="mcp-time"))).info
    assert info.name == "mcp-time"
    assert info.protocol_version == "2026-07-28"  # the SDK's automatic mode chose the new era
    watch = mcp.Watch(mcp_pb2.WatchRequest(server="mcp-time", resource_uris=["time://now"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await anext(aiter(watch))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no resource subscriptions


async def test_time_server_calls_and_a_bad_timezone_is_a_tool_error(
    client: AsyncMeshClient,
) -> None:
    now = await client.call_tool("mcp-time/get_current_time", timezone="Europe/Paris")
    assert not now.is_error
    assert now.structured is not None and now.structured["timezone"] == "Europe/Paris"
    converted = await client.call_tool(
        "mcp-time/convert_time", source_timezone="UTC", time="12:00", target_timezone="Asia/Tokyo"
    )
    assert converted.structured is not None
    assert converted.structured["target"]["datetime"].endswith("21:00:00+09:00")
    bad = await client.call_tool("mcp-time/get_current_time", timezone="Mars/Olympus_Mons")
    assert bad.is_error
    assert "Invalid timezone" in bad.text
    with pytest.raises(InvalidArgumentError) as err:
        await client.call_tool("mcp-time/get_current_time", tz="UTC")
    assert "arguments.timezone" in [v.field for v in err.value.field_violations]
    with pytest.raises(NotFoundError):
        await client.call_tool("mcp-time/get_future_time", timezone="UTC")


# -- server-everything: the 2025 handshake, by node in the sandbox ---------------------------


async def test_everything_tools_and_progress_in_order(
    client: AsyncMeshClient, mcp: mcp_pb2_grpc.McpServiceStub
) -> None:
    info = (await mcp.GetServerInfo(mcp_pb2.GetServerInfoRequest(server="mcp-everything"))).info
    assert info.protocol_version == "2025-11-25"
    assert info.capabilities.resources_subscribe and info.capabilities.completions
    assert (await client.call_tool("mcp-everything/echo", message="hi")).text == "Echo: hi"
    assert "42" in (await client.call_tool("mcp-everything/get-sum", a=40, b=2)).text
    stream = client.call_tool_stream(
        "mcp-everything/trigger-long-running-operation", duration=0.5, steps=5
    )
    events = [e async for e in stream]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 5 + ["result"]
    assert [e.progress.progress for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert all(e.progress.total == 5 for e in events[:-1])
    image = await client.call_tool("mcp-everything/get-tiny-image")
    blob = next(c.blob for c in image.content if c.WhichOneof("kind") == "blob")
    assert blob.mime_type == "image/png" and blob.data.startswith(b"\x89PNG")


async def test_everything_resources_prompts_and_completion(
    mcp: mcp_pb2_grpc.McpServiceStub,
) -> None:
    server = "mcp-everything"
    listed = await mcp.ListResources(mcp_pb2.ListResourcesRequest(server=server))
    assert any(r.mime_type == "text/markdown" for r in listed.resources)
    templates = await mcp.ListResourceTemplates(mcp_pb2.ListResourceTemplatesRequest(server=server))
    assert "demo://resource/dynamic/text/{resourceId}" in [
        t.uri_template for t in templates.resource_templates
    ]
    text = await mcp.ReadResource(mcp_pb2.ReadResourceRequest(server=server, uri=TEXT_URI))
    assert text.contents[0].text.startswith("Resource 1:")
    blob = await mcp.ReadResource(mcp_pb2.ReadResourceRequest(server=server, uri=BLOB_URI))
    assert blob.contents[0].WhichOneof("contents") == "blob"
    assert blob.contents[0].blob.startswith(b"Resource 1:")  # bytes, no longer base64
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mcp.ReadResource(mcp_pb2.ReadResourceRequest(server=server, uri="demo://nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    prompts = await mcp.ListPrompts(mcp_pb2.ListPromptsRequest(server=server))
    assert "args-prompt" in [p.name for p in prompts.prompts]
    prompt = await mcp.GetPrompt(
        mcp_pb2.GetPromptRequest(server=server, name="args-prompt", arguments={"city": "Paris"})
    )
    assert prompt.messages[0].role == mcp_pb2.PROMPT_ROLE_USER
    assert "Paris" in prompt.messages[0].content.text
    completed = await mcp.Complete(
        mcp_pb2.CompleteRequest(
            server=server, prompt="completable-prompt", argument_name="department",
            argument_value="Eng",
        )
    )  # fmt: skip
    assert completed.values == ["Engineering"]


async def test_watch_streams_resource_updates(
    client: AsyncMeshClient, mcp: mcp_pb2_grpc.McpServiceStub
) -> None:
    watch = mcp.Watch(mcp_pb2.WatchRequest(server="mcp-everything", resource_uris=[TEXT_URI]))
    toggled = await client.call_tool("mcp-everything/toggle-subscriber-updates")
    assert "Started" in toggled.text
    try:
        async with asyncio.timeout(10):
            async for event in watch:
                if event.HasField("resource_updated"):
                    assert event.resource_updated.uri == TEXT_URI
                    break
    finally:
        await client.call_tool("mcp-everything/toggle-subscriber-updates")
        watch.cancel()


async def test_cancelling_a_call_cancels_the_mcp_request(
    mesh: Mesh, client: AsyncMeshClient
) -> None:
    stream = client.call_tool_stream(
        "mcp-everything/trigger-long-running-operation", duration=20, steps=40
    )
    events = aiter(stream)
    # A log line the server sends meanwhile (the previous test's unsubscribe, say) is this
    # call's too: over stdio, a log while one request is in flight is that request's.
    first = await anext(events)
    while first.HasField("log"):
        first = await anext(events)
    assert first.HasField("progress"), first
    stream.cancel()
    with pytest.raises(CallCancelledError):
        await anext(events)
    wait_until(
        lambda: "mcp-everything[0]: sidecars.mcp: sent MCP cancellation of request" in mesh.log(),
        10,
        lambda: "the bridge to send notifications/cancelled\n" + mesh.log()[-3000:],
    )
    # The server goes on serving.
    assert (await client.call_tool("mcp-everything/echo", message="after")).text == "Echo: after"


async def test_server_stderr_is_the_plugins_log(mesh: Mesh) -> None:
    # server-everything writes this to stderr when it starts; the bridge logs each line.
    assert "mcp-everything[0]: mcp-server: Starting default (STDIO) server..." in mesh.log()


# -- sidemesh mcp: the mesh for MCP clients ------------------------------------------------


async def test_sidemesh_mcp_serves_tools_and_agents_to_an_mcp_client(mesh: Mesh) -> None:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "orchestrator.cli", "mcp", "-a", mesh.address],
        cwd=str(ROOT),
        env={**os.environ},
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        assert init.server_info.name == "sidemesh"
        assert init.capabilities.tools is not None and init.capabilities.tools.list_changed
        names = [t.name for t in (await session.list_tools()).tools]
        assert {"mcp-time.get_current_time", "tools-demo.add", "mcp-everything.get-sum"} <= set(
            names
        )
        assert "agent_assistant.assistant" in names
        added = await session.call_tool("tools-demo.add", {"a": 2, "b": 3})
        assert added.structured_content == {"result": 5} and not added.is_error
        now = await session.call_tool("mcp-time.get_current_time", {"timezone": "UTC"})
        assert now.structured_content is not None and now.structured_content["timezone"] == "UTC"
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        counted = await session.call_tool(
            "tools-demo.slow_count", {"n": 3}, progress_callback=on_progress
        )
        assert counted.content[0].text == "counted to 3" and progress == [1, 2, 3]
        divided = await session.call_tool("tools-demo.divide", {"a": 1, "b": 0})
        assert divided.is_error
        answer = await session.call_tool("agent_assistant.assistant", {"text": "What is 2 + 3?"})
        assert not answer.is_error and "5" in answer.content[0].text
        bad = await session.call_tool("tools-demo.add", {"a": "two", "b": 3})
        assert bad.is_error and "arguments.a" in bad.content[0].text  # a result the model reads


# -- failures: the server dies, never answers; nothing outlives the mesh --------------------


async def test_killed_server_call_is_unavailable_then_the_next_call_works(
    mesh: Mesh, client: AsyncMeshClient, mcp: mcp_pb2_grpc.McpServiceStub
) -> None:
    [node] = server_pids(mesh, "mcp-everything", "server-everything")
    assert node in processes_with(str(mesh.runtime_dir)), "the orphan check must see the server"
    watch = mcp.Watch(mcp_pb2.WatchRequest(server="mcp-everything"))
    stream = client.call_tool_stream(
        "mcp-everything/trigger-long-running-operation", duration=20, steps=40
    )
    events = aiter(stream)
    assert (await anext(events)).HasField("progress")
    os.kill(node, signal.SIGKILL)
    with pytest.raises(UnavailableError, match="exited"):
        async for _ in events:
            pass
    # The bridge restarts the server; watchers hear that its lists changed.
    try:
        async with asyncio.timeout(15):
            kinds = set()
            async for event in watch:
                kinds.add(event.WhichOneof("event"))
                if "tools_list_changed" in kinds:
                    break
    finally:
        watch.cancel()
    assert (await client.call_tool("mcp-everything/echo", message="again")).text == "Echo: again"
    [restarted] = wait_until(
        lambda: server_pids(mesh, "mcp-everything", "server-everything"), 5, "the new server"
    )
    assert restarted != node
    assert mesh.state("mcp-everything") == "READY"


def test_a_server_that_never_answers_fails_the_plugin_with_a_clear_error(
    make_mesh: Callable[..., Mesh], tmp_path: Path
) -> None:
    plugin = tmp_path / "plugins" / "mcp-silent"
    plugin.mkdir(parents=True)
    (plugin / "plugin.yaml").write_text(
        "name: mcp-silent\nversion: 1.0.0\nruntime: mcp\n"
        "mcp: {command: sleep, args: ['600'], request_timeout: 1.5}\n"
        "provides: {mcp: true}\nstartup_timeout: 20\n"
    )
    mesh = make_mesh(plugin_dirs=[str(plugin.parent)]).start()
    status = mesh.wait_state("mcp-silent", "FAILED", "CRASH_LOOP", timeout=30)
    wait_until(
        lambda: "did not answer its first request within 1.5s" in mesh.plugin("mcp-silent").error,
        20,
        lambda: f"the bridge's error in the plugin's status ({status.error!r})\n{mesh.log()}",
    )
    assert "sleep 600" in mesh.plugin("mcp-silent").error
