"""``sidemesh mcp``: the mesh as an MCP server over stdio, for MCP clients such as IDEs.

Every tool of the mesh, and every agent, is an MCP tool; calls go through the
mesh with ``clients.AsyncMeshClient``. Built on the official MCP SDK's
low-level ``Server``, so clients of both protocol eras work (the 2025
``initialize`` handshake and the 2026 stateless protocol).

Names. MCP tool names are 1-128 characters of ``[A-Za-z0-9_.-]``, so ``/``
cannot stay:

- a tool ``plugin/tool`` is ``plugin.tool``: plugin names have no dot, so the
  first dot splits it back;
- an agent ``plugin/agent`` is ``agent_plugin.agent``: a plugin name never
  holds ``_``, so no tool's name can begin that way; it takes ``text`` and an
  optional ``data`` object, and returns the agent's answer as text and its
  structured outputs as ``{"outputs": [...]}``;
- a name longer than 128 characters keeps its first 117 and ends with ``-``
  and 10 hex digits of its SHA-256: deterministic, and still unique.

Calls stream the mesh's progress events as MCP progress notifications (when
the client sent a progress token); a tool's ``is_error`` is ``isError``; a
gRPC error is an MCP error naming its status. When the mesh's catalog changes
(its events, or a poll), clients get ``notifications/tools/list_changed``.
Stdout is the protocol: logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from google.protobuf import json_format
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ToolsListChanged

from clients import AsyncMeshClient, SidemeshError, struct_to_dict
from orchestrator.cli._common import add_mesh_options, mesh_address, mesh_client
from sidemesh.v1 import agent_pb2, common_pb2

log = logging.getLogger("sidemesh.mcp")

#: MCP's limit on tool names, and the prefix that marks an agent.
MAX_NAME, AGENT_PREFIX = 128, "agent_"
#: Hex digits of the hash that ends a shortened name.
_HASH_DIGITS = 10
#: Seconds between catalog checks when no mesh event arrives.
POLL_INTERVAL = 5.0
#: Seconds to let a burst of mesh events settle before checking the catalog.
_SETTLE = 0.2

AGENT_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "The input for the agent, in words"},
        "data": {"type": "object", "description": "Optional structured input for the agent"},
    },
    "required": ["text"],
    "additionalProperties": False,
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``mcp``."""
    p = sub.add_parser(
        "mcp",
        help="serve the mesh's tools and agents to an MCP client, over stdio",
        description="Serve the mesh as an MCP server on stdin/stdout, for MCP clients such as "
        "IDEs: tools as plugin.tool, agents as agent_plugin.agent. Logs go to stderr.",
    )
    add_mesh_options(p)
    p.set_defaults(run=_run)


def mcp_name(qualified: str, *, agent: bool = False) -> str:
    """The MCP tool name of a mesh tool or agent ``plugin/name`` (see the module docstring)."""
    plugin, _, name = qualified.partition("/")
    full = f"{AGENT_PREFIX if agent else ''}{plugin}.{name}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_DIGITS]
    return f"{full[: MAX_NAME - _HASH_DIGITS - 1]}-{digest}"


@dataclass(frozen=True, slots=True)
class Target:
    """What an MCP tool name calls in the mesh."""

    qualified: str
    agent: bool
    tool: types.Tool


def catalog(tools: list[Any], agents: list[agent_pb2.AgentDescriptor]) -> dict[str, Target]:
    """The MCP tools for the mesh's tool and agent descriptors, by MCP name."""
    targets: dict[str, Target] = {}
    for d in tools:
        name = mcp_name(d.qualified_name)
        schema = struct_to_dict(d.input_schema) if d.HasField("input_schema") else {}
        hints = d.annotations
        tool = types.Tool(
            name=name,
            title=d.title or None,
            description=d.description or f"Tool {d.qualified_name} of the Sidemesh mesh",
            input_schema=schema or {"type": "object"},
            output_schema=struct_to_dict(d.output_schema) if d.HasField("output_schema") else None,
            annotations=types.ToolAnnotations(
                read_only_hint=hints.read_only if hints.HasField("read_only") else None,
                idempotent_hint=hints.idempotent if hints.HasField("idempotent") else None,
                destructive_hint=hints.destructive if hints.HasField("destructive") else None,
                open_world_hint=hints.open_world if hints.HasField("open_world") else None,
            )
            if d.HasField("annotations")
            else None,
        )
        targets[name] = Target(d.qualified_name, False, tool)
    for a in agents:
        name = mcp_name(a.qualified_name, agent=True)
        about = a.description or "an agent of the Sidemesh mesh"
        tool = types.Tool(
            name=name,
            description=f"Agent {a.qualified_name}: {about}",
            input_schema=AGENT_INPUT_SCHEMA,
        )
        targets[name] = Target(a.qualified_name, True, tool)
    return dict(sorted(targets.items()))


class MeshMcpServer:
    """An MCP server whose tools are the mesh's tools and agents."""

    def __init__(self, mesh: AsyncMeshClient) -> None:
        self._mesh = mesh
        self._targets: dict[str, Target] = {}
        self._digest = ""
        self._sessions: set[ServerSession] = set()
        self._bus = InMemorySubscriptionBus()
        self.server: Server[Any] = Server(
            "sidemesh",
            version="0.1.0",
            instructions="Tools and agents of a Sidemesh mesh. A tool plugin/tool is named "
            "plugin.tool; an agent plugin/agent is agent_plugin.agent and takes 'text'.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_subscriptions_listen=ListenHandler(self._bus),
        )

    async def serve(self) -> None:
        """Serves MCP on stdin/stdout until the client closes it."""
        options = self.server.create_initialization_options(NotificationOptions(tools_changed=True))
        follow = asyncio.create_task(self.follow_catalog())
        try:
            async with stdio_server() as (read, write):
                await self.server.run(read, write, options)
        finally:
            follow.cancel()

    # -- the catalog -------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Reads the mesh's tools and agents; returns whether the MCP tool list changed."""
        tools = await self._mesh.list_tools()
        agents = await self._mesh.list_agents()
        self._targets = catalog(tools, agents)
        listed = [t.tool.model_dump(by_alias=True, mode="json") for t in self._targets.values()]
        digest = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
        changed, self._digest = digest != self._digest, digest
        return changed

    async def follow_catalog(self) -> None:
        """Tells clients ``tools/list_changed`` whenever the mesh's catalog changes."""
        wake = asyncio.Event()
        events = asyncio.create_task(self._watch_events(wake))
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
                await asyncio.sleep(_SETTLE if wake.is_set() else 0)
                wake.clear()
                was_listed = bool(self._digest)
                try:
                    changed = await self.refresh()
                except SidemeshError as err:
                    log.warning("cannot read the mesh's catalog: %s", err)
                    continue
                if changed and was_listed:
                    await self._announce()
        finally:
            events.cancel()

    async def _watch_events(self, wake: asyncio.Event) -> None:
        """Wakes the catalog check on every plugin lifecycle event of the mesh."""
        while True:
            try:
                async for _ in self._mesh.watch_events(lifecycle_only=True):
                    wake.set()
            except SidemeshError as err:
                log.debug("mesh events ended: %s", err)
            await asyncio.sleep(POLL_INTERVAL)

    async def _announce(self) -> None:
        log.info("the mesh's tools changed: %d MCP tools", len(self._targets))
        await self._bus.publish(ToolsListChanged())  # 2026 clients, on subscriptions/listen
        for session in list(self._sessions):  # 2025 clients, on their connection
            try:
                await session.send_tool_list_changed()
            except Exception:
                self._sessions.discard(session)

    # -- MCP handlers --------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self._sessions.add(ctx.session)
        try:
            await self.refresh()
        except SidemeshError as err:
            raise _mcp_error(err) from None
        return types.ListToolsResult(tools=[t.tool for t in self._targets.values()])

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        target = self._targets.get(params.name)
        if target is None:
            with contextlib.suppress(SidemeshError):
                await self.refresh()
            target = self._targets.get(params.name)
        if target is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        arguments = params.arguments or {}
        try:
            if target.agent:
                return await self._invoke(ctx, target, arguments)
            return await self._call(ctx, target, arguments)
        except SidemeshError as err:
            raise _mcp_error(err) from None

    async def _call(
        self, ctx: ServerRequestContext[Any], target: Target, arguments: dict[str, Any]
    ) -> types.CallToolResult:
        stream = self._mesh.call_tool_stream(target.qualified, arguments)
        try:
            async for event in stream:
                if event.HasField("progress"):
                    await _progress(ctx, event.progress)
        finally:
            stream.cancel()  # a no-op once ended; stops the mesh call if the client cancelled
        result = stream.result
        assert result is not None  # the stream raises when it ends without one
        return types.CallToolResult(
            content=[_content(c) for c in result.content],
            structured_content=result.structured,
            is_error=result.is_error,
        )

    async def _invoke(
        self, ctx: ServerRequestContext[Any], target: Target, arguments: dict[str, Any]
    ) -> types.CallToolResult:
        text, data = arguments.get("text", ""), arguments.get("data")
        if not isinstance(text, str) or not (data is None or isinstance(data, dict)):
            raise MCPError(types.INVALID_PARAMS, "an agent takes 'text' (a string) and 'data'")
        agent_input = agent_pb2.AgentInput(text=text)
        if data:
            json_format.ParseDict(data, agent_input.data)
        stream = self._mesh.invoke(target.qualified, agent_input)
        answer: list[str] = []
        outputs: list[dict[str, Any]] = []
        result = agent_pb2.AgentResult()
        try:
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "text_delta":
                    answer.append(event.text_delta.text)
                elif kind == "output":
                    outputs.append(struct_to_dict(event.output.data))
                elif kind == "progress":
                    await _progress(ctx, event.progress)
                elif kind == "result":
                    result = event.result
        finally:
            stream.cancel()
        failed = result.status == agent_pb2.AGENT_RESULT_STATUS_FAILED
        reply = "".join(answer)
        if failed:
            reply = f"{reply}\n[the agent's turn failed: {result.message}]".strip()
        return types.CallToolResult(
            content=[types.TextContent(text=reply)],
            structured_content={"outputs": outputs} if outputs else None,
            is_error=failed,
        )


async def _progress(ctx: ServerRequestContext[Any], progress: common_pb2.Progress) -> None:
    """A mesh progress event as an MCP progress notification (a no-op without a token)."""
    total = progress.total if progress.HasField("total") else None
    await ctx.session.report_progress(progress.progress, total, progress.message or None)


def _content(part: common_pb2.Content) -> types.ContentBlock:
    """A mesh content part as an MCP content block."""
    kind = part.WhichOneof("kind")
    if kind == "json":
        return types.TextContent(text=json_format.MessageToJson(part.json, indent=None))
    if kind == "blob":
        data, mime = base64.b64encode(part.blob.data).decode(), part.blob.mime_type
        if mime.startswith("image/"):
            return types.ImageContent(data=data, mime_type=mime)
        if mime.startswith("audio/"):
            return types.AudioContent(data=data, mime_type=mime)
        return types.EmbeddedResource(
            resource=types.BlobResourceContents(uri="sidemesh:blob", mime_type=mime, blob=data)
        )
    if kind == "resource_link":
        link = part.resource_link
        return types.ResourceLink(
            uri=link.uri, name=link.name or link.uri, title=link.title or None,
            description=link.description or None, mime_type=link.mime_type or None,
            size=link.size if link.HasField("size") else None,
        )  # fmt: skip
    if kind == "resource":
        res = part.resource
        contents: types.TextResourceContents | types.BlobResourceContents
        if res.WhichOneof("contents") == "blob":
            blob = base64.b64encode(res.blob).decode()
            contents = types.BlobResourceContents(uri=res.uri, mime_type=res.mime_type, blob=blob)
        else:
            contents = types.TextResourceContents(
                uri=res.uri, mime_type=res.mime_type, text=res.text
            )
        return types.EmbeddedResource(resource=contents)
    return types.TextContent(text=part.text)


def _mcp_error(err: SidemeshError) -> MCPError:
    """A mesh error as an MCP error: bad input is invalid params, the rest an internal error."""
    message = f"{err.code.name}: {err.message}"  # the mesh's messages name the bad fields
    if err.code.name in ("INVALID_ARGUMENT", "NOT_FOUND"):
        return MCPError(types.INVALID_PARAMS, message)
    return MCPError(types.INTERNAL_ERROR, message)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    address = mesh_address(args)
    client = mesh_client(args, address)
    log.info("serving the mesh at %s over MCP on stdio (%s)", address,
             client.credentials.describe())  # fmt: skip

    async def main() -> None:
        async with client as mesh:
            await MeshMcpServer(mesh).serve()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
