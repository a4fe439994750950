"""``PluginService`` and ``ToolService`` of the bridge: the MCP server as a mesh plugin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from plugins_sdk.serving import grace_period
from sidecars.mcp._calls import Context, server_chain, stream_tool_call, unary
from sidecars.mcp._link import ServerLink
from sidecars.mcp._spec import RUNTIME
from sidemesh.core import CONTRACT_VERSION
from sidemesh.v1 import plugin_pb2, plugin_pb2_grpc, tool_pb2, tool_pb2_grpc


class McpPluginServicer(plugin_pb2_grpc.PluginServiceServicer):
    """The plugin's identity (the MCP server's), its tools, and its shutdown."""

    def __init__(self, link: ServerLink, stop: Callable[[float], Awaitable[None]]) -> None:
        self._link = link
        self._stop = stop

    async def Describe(
        self, request: plugin_pb2.DescribeRequest, context: Context
    ) -> plugin_pb2.DescribeResponse:
        """The plugin named as in its manifest, versioned as its MCP server; every MCP tool."""
        info = self._link.info
        return plugin_pb2.DescribeResponse(
            plugin=plugin_pb2.PluginInfo(
                name=self._link.plugin,
                version=info.version,
                description=info.title or f"MCP server {info.name}",
                contract_version=CONTRACT_VERSION,
                runtime=RUNTIME,
            ),
            tools=self._link.catalog.descriptors(),
            mcp_server=info,
        )

    async def Configure(
        self, request: plugin_pb2.ConfigureRequest, context: Context
    ) -> plugin_pb2.ConfigureResponse:
        """Accepted: an MCP server takes its settings from its command line and environment."""
        return plugin_pb2.ConfigureResponse()

    async def Shutdown(
        self, request: plugin_pb2.ShutdownRequest, context: Context
    ) -> plugin_pb2.ShutdownResponse:
        """Starts draining; calls in flight get the grace period, then the server is stopped."""
        await self._stop(grace_period(request))
        return plugin_pb2.ShutdownResponse()


class McpToolServicer(tool_pb2_grpc.ToolServiceServicer):
    """The MCP server's tools as ``plugin/tool`` in the mesh."""

    def __init__(self, link: ServerLink) -> None:
        self._link = link
        self._chain = server_chain(link, "sidemesh.v1.ToolService")

    async def ListTools(
        self, request: tool_pb2.ListToolsRequest, context: Context
    ) -> tool_pb2.ListToolsResponse:
        """Every MCP tool, by name; none when the request names another plugin."""

        async def body(timeout: float) -> tool_pb2.ListToolsResponse:
            if request.plugin and request.plugin != self._link.plugin:
                return tool_pb2.ListToolsResponse()
            return tool_pb2.ListToolsResponse(tools=self._link.catalog.descriptors())

        return await unary(self._chain, "ListTools", context, "", body, self._link)

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: Context
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        """Checks the arguments, calls the MCP tool, streams its progress, then its result."""
        calls = stream_tool_call(
            self._chain, self._link, context, request.tool, request.arguments,
            tool_pb2.CallToolResponse,
        )  # fmt: skip
        async with aclosing(calls):
            async for message in calls:
                yield message
