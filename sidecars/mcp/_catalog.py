"""The MCP server's tools as the bridge knows them: what ``Describe`` and ``ListTools`` show.

Listed in full (every page) when a session starts and again whenever the
server says its tool list changed; each tool's input schema is compiled once
here, to check arguments before a call reaches the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import mcp_types as types
from jsonschema.protocols import Validator
from mcp.client.session import ClientSession

from sidecars.mcp._arguments import compile_schema
from sidecars.mcp._convert import tool_descriptor
from sidemesh.core import NotFoundError
from sidemesh.v1 import tool_pb2

#: Most pages read when listing tools: a server whose cursors never end cannot hang the bridge.
MAX_PAGES = 100
#: Most names a NOT_FOUND message lists.
_MAX_NAMES = 20


@dataclass(frozen=True, slots=True)
class ServerTool:
    """One MCP tool: as MCP describes it, as the mesh describes it, and its argument check."""

    tool: types.Tool
    descriptor: tool_pb2.ToolDescriptor
    validator: Validator | None


async def list_all_tools(session: ClientSession) -> list[types.Tool]:
    """Every tool the server offers, following its cursors page after page."""
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


class ServerCatalog:
    """The tools of the plugin's MCP server, by name."""

    def __init__(self, plugin: str) -> None:
        self._plugin = plugin
        self._tools: dict[str, ServerTool] = {}

    def replace(self, tools: list[types.Tool]) -> None:
        """Takes a fresh listing (the last tool of a name wins)."""
        self._tools = {
            t.name: ServerTool(t, tool_descriptor(t), compile_schema(t.name, t.input_schema))
            for t in sorted(tools, key=lambda t: t.name)
        }

    def descriptors(self) -> list[tool_pb2.ToolDescriptor]:
        """The tools' descriptors, by name."""
        return [entry.descriptor for entry in self._tools.values()]

    def __len__(self) -> int:
        return len(self._tools)

    def tool(self, target: str) -> ServerTool:
        """The tool a request names (``name`` or ``plugin/name``); ``NotFoundError`` if none."""
        plugin, sep, name = target.rpartition("/")
        entry = self._tools.get(name if sep and plugin == self._plugin else target)
        if entry is None:
            known = ", ".join(list(self._tools)[:_MAX_NAMES]) or "none"
            raise NotFoundError(
                f"the MCP server of plugin {self._plugin!r} has no tool {target!r}; "
                f"its tools: {known}",
                reason="TARGET_NOT_FOUND",
            )
        return entry
