"""The mesh as an MCP gateway, as MCP users meet it: real MCP clients (the official SDK's stdio
and streamable-HTTP clients, the MCP Inspector CLI) in front of ``sidemesh mcp`` and the HTTP
endpoint of ``sidemesh serve``, real MCP servers behind (server-everything, server-memory,
mcp-server-time) in a sandboxed mesh.

server-everything asks its client for sampling, elicitation and roots during a call: the test's
MCP client answers them through the mesh, and a plain gRPC caller gets a clear refusal.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.client.subscriptions import ResourceUpdated
from mcp.shared.exceptions import MCPError
from meshproc import EXAMPLE_PLUGINS, ROOT, Mesh

from clients import AsyncMeshClient, MeshClient, NotFoundError

pytestmark = pytest.mark.integration

INSPECTOR = ROOT / "tests" / "tools" / "mcp-inspector" / "node_modules" / ".bin" / "mcp-inspector"
# `make setup` (npm ci) installs them; a missing one must fail these tests, not skip them.
assert INSPECTOR.exists(), "the MCP Inspector is missing: run `make setup` (npm ci installs it)"
_MEMORY = EXAMPLE_PLUGINS / "mcp-memory" / "node_modules" / "@modelcontextprotocol"
assert (_MEMORY / "server-memory").is_dir(), "server-memory is missing: run `make setup`"

DOC_URI = "demo://resource/static/document/features.md"
GRAPH_URI = "memory://knowledge-graph"
PLUGINS = ["mcp-everything", "mcp-memory", "mcp-time", "tools-demo"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One sandboxed mesh with the MCP examples, its HTTP endpoint, and a virtual server."""
    notes = {
        "title": "Notes",
        "tools": ["mcp-memory/*"],
        "resources": ["mcp-memory/*"],
        "prompts": [],
        "rename": {"mcp-memory/read_graph": "recall"},
        "descriptions": {"mcp-memory/search_nodes": "Find notes by text"},
    }
    m = Mesh(
        tmp_path_factory.mktemp("gateway"),
        plugin_dirs=[str(EXAMPLE_PLUGINS)],
        plugins={"assistant": {"enabled": False}},
        mcp={"http": {"enabled": True, "listen": "127.0.0.1:0"}, "servers": {"notes": notes}},
    )
    try:
        m.start(ready=PLUGINS)
        yield m
        assert m.stop() == 0
    finally:
        m.cleanup()


def http_url(mesh: Mesh, server: str = "sidemesh") -> str:
    endpoints = json.loads((mesh.state_dir / "endpoints.json").read_text())
    return str(endpoints["mcp"][server])


class Answers:
    """The test's MCP client side: it answers the server's requests and keeps its logs."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.logs: list[Any] = []

    async def sampling(
        self, ctx: Any, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        self.asked.append("sampling")
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(text="forty-two"), model="test-model"
        )

    async def elicitation(self, ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.asked.append("elicitation")
        return types.ElicitResult(action="decline")

    async def roots(self, ctx: Any) -> types.ListRootsResult:
        self.asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///workspace", name="ws")])

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)

    def callbacks(self) -> dict[str, Any]:
        return {
            "sampling_callback": self.sampling,
            "elicitation_callback": self.elicitation,
            "list_roots_callback": self.roots,
            "logging_callback": self.log,
        }


@asynccontextmanager
async def stdio_session(
    mesh: Mesh, answers: Answers, *options: str
) -> AsyncIterator[ClientSession]:
    """The official SDK's stdio client (2025-11-25 handshake) on ``sidemesh mcp``."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "orchestrator.cli", "mcp", *(options or ("-a", mesh.address))],
        cwd=str(ROOT),
        env={**os.environ},
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, **answers.callbacks()) as session,
    ):
        await session.initialize()
        yield session


def run_inspector(*args: str, catalog: Path) -> Any:
    """Runs the MCP Inspector's CLI (offline, from node_modules); returns its JSON output.

    Its catalog and storage go beside ``catalog`` rather than to the user's home."""
    env = {**os.environ, "MCP_CATALOG_PATH": str(catalog), "HOME": str(catalog.parent)}
    done = subprocess.run(
        [str(INSPECTOR), "--cli", *args], capture_output=True, text=True, timeout=60,
        cwd=str(ROOT), stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# -- sidemesh mcp (stdio) -----------------------------------------------------------------


async def test_sidemesh_mcp_serves_resources_prompts_and_completion(mesh: Mesh) -> None:
    async with stdio_session(mesh, Answers()) as session:
        caps = (await session.initialize()).capabilities
        assert caps.resources is not None and caps.resources.subscribe
        assert caps.prompts is not None and caps.completions is not None
        uris = [r.uri for r in (await session.list_resources()).resources]
        assert DOC_URI in uris and GRAPH_URI in uris
        templates = (await session.list_resource_templates()).resource_templates
        assert "demo://resource/dynamic/text/{resourceId}" in [t.uri_template for t in templates]
        doc = (await session.read_resource(DOC_URI)).contents[0]
        assert isinstance(doc, types.TextResourceContents) and "Features" in doc.text
        # A URI no listing names, found through the template that matches it.
        dynamic = (await session.read_resource("demo://resource/dynamic/text/7")).contents[0]
        assert isinstance(dynamic, types.TextResourceContents) and "Resource 7" in dynamic.text
        with pytest.raises(MCPError) as unknown:
            await session.read_resource("demo://nowhere")
        assert unknown.value.code == -32002  # resource not found, as 2025 clients expect
        prompts = {p.name: p for p in (await session.list_prompts()).prompts}
        assert "mcp-everything.args-prompt" in prompts
        assert [a.name for a in prompts["mcp-everything.args-prompt"].arguments] == [
            "city",
            "state",
        ]
        rendered = await session.get_prompt("mcp-everything.args-prompt", {"city": "Paris"})
        assert "Paris" in rendered.messages[0].content.text  # type: ignore[union-attr]
        completed = await session.complete(
            types.PromptReference(name="mcp-everything.completable-prompt"),
            {"name": "department", "value": "Eng"},
        )
        assert completed.completion.values == ["Engineering"]


async def test_sidemesh_mcp_serves_a_virtual_server_of_the_config(mesh: Mesh) -> None:
    options = ("-c", str(mesh.config_path), "--server", "notes")  # finds the running mesh
    async with stdio_session(mesh, Answers(), *options) as session:
        names = sorted(t.name for t in (await session.list_tools()).tools)
        assert "recall" in names and all(
            n.startswith("mcp-memory.") or n == "recall" for n in names
        )
        assert [r.uri for r in (await session.list_resources()).resources] == [GRAPH_URI]


async def test_sidemesh_mcp_schema_errors_are_tool_results_the_model_can_read(
    mesh: Mesh,
) -> None:
    async with stdio_session(mesh, Answers()) as session:
        bad = await session.call_tool("tools-demo.add", {"a": "two", "b": 3})
        assert bad.is_error
        assert "arguments.a" in bad.content[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="Unknown tool"):
            await session.call_tool("tools-demo.nope", {})


async def test_sampling_roots_and_logs_reach_the_mcp_client_that_made_the_call(
    mesh: Mesh,
) -> None:
    answers = Answers()
    async with stdio_session(mesh, answers) as session:
        sampled = await session.call_tool(
            "mcp-everything.trigger-sampling-request", {"prompt": "the answer?"}
        )
        assert not sampled.is_error and "forty-two" in sampled.content[0].text  # type: ignore[union-attr]
        declined = await session.call_tool("mcp-everything.trigger-elicitation-request", {})
        assert "decline" in json.dumps(declined.model_dump(mode="json")).lower()
        roots = await session.call_tool("mcp-everything.get-roots-list", {})
        assert "file:///workspace" in roots.content[0].text  # type: ignore[union-attr]
    assert answers.asked == ["sampling", "elicitation", "roots"]
    # server-everything logs the roots it received: a log of the call, sent to its caller.
    assert any("root(s) received" in str(data) for data in answers.logs), answers.logs


@pytest.mark.filterwarnings("ignore:.*logging.*deprecated")  # the 2025 way, still served
async def test_server_logs_outside_calls_reach_clients_that_set_a_level(mesh: Mesh) -> None:
    answers = Answers()
    async with stdio_session(mesh, answers) as session:
        await session.set_logging_level("debug")
        await session.call_tool("mcp-everything.toggle-simulated-logging", {})  # starts them
        try:
            seen = len(answers.logs)
            for _ in range(100):  # server-everything logs every 5 s
                if any("-level message" in str(d) for d in answers.logs[seen:]):
                    break
                await asyncio.sleep(0.1)
            assert any("-level message" in str(d) for d in answers.logs[seen:]), answers.logs
        finally:
            await session.call_tool("mcp-everything.toggle-simulated-logging", {})  # stops them


async def test_a_grpc_caller_that_cannot_answer_gets_a_clear_refusal(mesh: Mesh) -> None:
    async with AsyncMeshClient(mesh.address, timeout=20) as client:
        plain = await client.call_tool("mcp-everything/trigger-sampling-request", prompt="x")
        assert plain.is_error  # server-everything reports the MCP error as its tool's error
        assert "cannot answer sampling" in plain.text and "CallToolInteractive" in plain.text

        async def answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
            assert method == "sampling/createMessage"
            assert "the answer?" in json.dumps(params)
            content = {"type": "text", "text": "from gRPC"}
            return {"role": "assistant", "content": content, "model": "grpc-model"}

        answered = await client.call_mcp_tool(
            "mcp-everything", "trigger-sampling-request", {"prompt": "the answer?"},
            on_server_request=answer, sampling=True,
        )  # fmt: skip
        assert not answered.is_error and "from gRPC" in answered.text
        undeclared = await client.call_mcp_tool(
            "mcp-everything", "trigger-sampling-request", {"prompt": "x"}, roots=True
        )
        assert "did not declare that it can answer sampling" in undeclared.text
        with pytest.raises(NotFoundError):
            await client.read_resource("mcp-everything", "demo://nowhere")


def test_the_blocking_client_lists_and_reads_resources_and_prompts(mesh: Mesh) -> None:
    with MeshClient(mesh.address, timeout=20) as client:
        assert {"mcp-everything", "mcp-memory", "mcp-time"} <= set(client.list_mcp_servers())
        assert DOC_URI in [r.uri for r in client.list_resources("mcp-everything")]
        assert "Features" in client.read_resource("mcp-everything", DOC_URI)[0].text
        assert "args-prompt" in [p.name for p in client.list_prompts("mcp-everything")]
        rendered = client.get_prompt("mcp-everything", "args-prompt", {"city": "Rome"})
        assert "Rome" in rendered.messages[0].content.text
        with pytest.raises(NotFoundError):
            client.read_resource("mcp-everything", "demo://nowhere")


# -- the streamable-HTTP endpoint -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_http_endpoint_serves_both_protocol_eras(mesh: Mesh, mode: str) -> None:
    answers = Answers()
    async with Client(http_url(mesh), mode=mode, **answers.callbacks()) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        tools = [t.name for t in (await client.list_tools()).tools]
        assert {"mcp-time.get_current_time", "mcp-memory.read_graph", "tools-demo.add"} <= set(
            tools
        )
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        counted = await client.call_tool(
            "tools-demo.slow_count", {"n": 3, "delay": 0.05}, progress_callback=on_progress
        )
        assert counted.content[0].text == "counted to 3" and progress == [1, 2, 3]  # type: ignore[union-attr]
        doc = (await client.read_resource(DOC_URI)).contents[0]
        assert isinstance(doc, types.TextResourceContents) and "Features" in doc.text
        names = [p.name for p in (await client.list_prompts()).prompts]
        assert "mcp-everything.simple-prompt" in names
        # Sampling: a server request on the call's SSE stream (2025) or input_required (2026).
        sampled = await client.call_tool(
            "mcp-everything.trigger-sampling-request", {"prompt": "the answer?"}
        )
        assert "forty-two" in sampled.content[0].text  # type: ignore[union-attr]
    assert answers.asked == ["sampling"]


async def test_server_memory_keeps_its_graph_in_the_plugin_data_dir(mesh: Mesh) -> None:
    entity = {"name": "sidemesh", "entityType": "project", "observations": ["an MCP gateway"]}
    async with Client(http_url(mesh, "notes")) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert "recall" in tools and "mcp-memory.create_entities" in tools
        assert "mcp-time.get_current_time" not in tools and "tools-demo.add" not in tools
        assert tools["mcp-memory.search_nodes"].description == "Find notes by text"
        created = await client.call_tool("mcp-memory.create_entities", {"entities": [entity]})
        assert not created.is_error
        recalled = await client.call_tool("recall", {})
        assert "an MCP gateway" in recalled.content[0].text  # type: ignore[union-attr]
        assert [r.uri for r in (await client.list_resources()).resources] == [GRAPH_URI]
        assert (await client.list_prompts()).prompts == []
        graph = (await client.read_resource(GRAPH_URI)).contents[0]
        assert isinstance(graph, types.TextResourceContents) and "an MCP gateway" in graph.text
    stored = mesh.state_dir / "data" / "mcp-memory" / "memory.jsonl"
    assert "an MCP gateway" in stored.read_text()


# -- the MCP Inspector ----------------------------------------------------------------------


def test_the_inspector_lists_and_reads_resources_and_prompts_through_sidemesh_mcp(
    mesh: Mesh, tmp_path: Path
) -> None:
    inspector = functools.partial(run_inspector, catalog=tmp_path / "mcp.json")
    stdio = ["--cwd", str(ROOT), sys.executable, "-m", "orchestrator.cli", "mcp", "-a"]
    target = [*stdio, mesh.address]
    listed = inspector(*target, "--method", "resources/list")
    assert DOC_URI in [r["uri"] for r in listed["resources"]]
    read = inspector(*target, "--method", "resources/read", "--uri", DOC_URI)
    assert "Features" in read["contents"][0]["text"]
    prompts = inspector(*target, "--method", "prompts/list")
    assert "mcp-everything.simple-prompt" in [p["name"] for p in prompts["prompts"]]
    got = inspector(*target, "--method", "prompts/get", "--prompt-name",
                    "mcp-everything.args-prompt", "--prompt-args", "city=Oslo")  # fmt: skip
    assert "Oslo" in got["messages"][0]["content"]["text"]


def test_the_inspector_lists_and_reads_resources_and_prompts_over_http(
    mesh: Mesh, tmp_path: Path
) -> None:
    inspector = functools.partial(run_inspector, catalog=tmp_path / "mcp.json")
    url = http_url(mesh)
    listed = inspector(url, "--method", "resources/list")
    assert GRAPH_URI in [r["uri"] for r in listed["resources"]]
    read = inspector(url, "--method", "resources/read", "--uri", DOC_URI)
    assert "Features" in read["contents"][0]["text"]
    prompts = inspector(url, "--method", "prompts/list")
    assert "mcp-everything.args-prompt" in [p["name"] for p in prompts["prompts"]]
    got = inspector(url, "--method", "prompts/get", "--prompt-name",
                    "mcp-everything.simple-prompt")  # fmt: skip
    assert got["messages"][0]["content"]["text"] == "This is a simple prompt without arguments."


@pytest.mark.filterwarnings("ignore:resources/subscribe is removed")  # the 2025 way, still served
async def test_resource_subscriptions_reach_clients_of_both_eras(mesh: Mesh) -> None:
    updated = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.set()

    entity = {"name": "watched", "entityType": "thing", "observations": ["changes"]}
    async with (
        Client(http_url(mesh), mode="legacy", message_handler=on_message) as legacy,
        Client(http_url(mesh)) as modern,
        modern.listen(resource_subscriptions=[GRAPH_URI]) as subscription,
    ):
        await legacy.subscribe_resource(GRAPH_URI)
        await asyncio.sleep(0.5)  # the gateway opens the plugin's Watch with the new URI
        await modern.call_tool("mcp-memory.create_entities", {"entities": [entity]})
        await asyncio.wait_for(updated.wait(), 10)
        event = await asyncio.wait_for(anext(aiter(subscription)), 10)
        assert isinstance(event, ResourceUpdated) and event.uri == GRAPH_URI
