"""MeshService: what the mesh offers and what happens in it, for clients and operators."""

from __future__ import annotations

import difflib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from orchestrator._catalog import Catalog
from orchestrator._events import EventBus
from orchestrator._plugin import PluginRuntime
from orchestrator._trace_store import TraceStore
from sidemesh.core import (
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    SidemeshError,
)
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc, tool_pb2

if TYPE_CHECKING:
    from orchestrator._own_access import OwnAccess

T = TypeVar("T")

Context = grpc.aio.ServicerContext[Any, Any]


#: Set by the data plane on calls it passes to the orchestrator's own services (clients
#: cannot send it: the data plane strips every ``sidemesh-*`` key a client sends).
CALLER_KEY = "sidemesh-caller"


def caller_of(context: Context, plugins: Mapping[str, PluginRuntime]) -> PluginRuntime | None:
    """The plugin whose callback socket the call came in on; None for a client's call."""
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_KEY:
            return plugins.get(str(value))
    return None


class MeshService(mesh_pb2_grpc.MeshServiceServicer):
    """Answers from the orchestrator's own state; never calls a sidecar.

    On a plugin's callback socket it shows the plugin only the agents and tools
    it may call, and nothing of the other plugins' status, traces or events
    unless the operator granted ``permissions.mesh: [read]``.
    """

    def __init__(
        self,
        catalog: Catalog,
        plugins: Mapping[str, PluginRuntime],
        events: EventBus,
        traces: TraceStore | None,
        *,
        trace_usage: Callable[[str], mesh_pb2.TraceUsage | None] | None = None,
        own: OwnAccess | None = None,
    ) -> None:
        self._own = own
        self._catalog = catalog
        self._plugins = plugins
        self._events = events
        self._traces = traces
        self._trace_usage = trace_usage

    async def _require_read(self, context: Context, method: str) -> None:
        """PERMISSION_DENIED (and an event) for a plugin the operator granted no mesh reads."""
        caller = caller_of(context, self._plugins)
        if caller is None:
            return
        grant = caller.override.permissions
        if grant is not None and "read" in grant.mesh:
            return
        plugin = caller.name
        reason = (
            f"plugin {plugin!r} may not use MeshService/{method} on its callback socket: it "
            f"shows the other plugins' status, traces and events; the operator can grant it "
            f"with plugins.{plugin}.permissions.mesh: [read] in the Sidemesh config"
        )
        self._events.emit(
            plugin,
            "permission_denied",
            mesh_pb2.PermissionDenied(
                caller=plugin, target="MeshService", method=method, reason=reason
            ),
        )
        await PermissionDeniedError(
            reason, reason="MESH_API_NOT_GRANTED", metadata={"caller": plugin}
        ).abort(context)

    def _listed(self, context: Context, kind: str, items: list[T]) -> list[T]:
        """The descriptors the caller may call."""
        return visible_to(context, kind, items, self._own, self._plugins)

    async def _visible(self, context: Context, kind: str, qualified: str) -> None:
        if self._own is not None:
            try:
                self._own.may(context, kind, qualified)
            except SidemeshError as err:
                await err.abort(context)
            return
        caller = caller_of(context, self._plugins)
        if caller is not None and not caller.may_call(kind, qualified):
            await PermissionDeniedError(
                f"plugin {caller.name!r} may not call {kind} {qualified!r}, so it cannot look "
                "it up either",
                reason="PERMISSION_DENIED",
            ).abort(context)

    def plugin_status(self, plugin: PluginRuntime) -> mesh_pb2.PluginStatus:
        """The status of one plugin, with what its spans take in the trace store."""
        agents, tools = self._catalog.names_of(plugin.name)
        status = plugin.status(agents, tools)
        usage = self._trace_usage(plugin.name) if self._trace_usage is not None else None
        if usage is not None:
            status.trace_usage.CopyFrom(usage)
        return status

    async def ListPlugins(
        self, request: mesh_pb2.ListPluginsRequest, context: Context
    ) -> mesh_pb2.ListPluginsResponse:
        """Every plugin, by name."""
        await self._require_read(context, "ListPlugins")
        plugins = [self.plugin_status(self._plugins[n]) for n in sorted(self._plugins)]
        return mesh_pb2.ListPluginsResponse(plugins=plugins)

    async def GetPlugin(
        self, request: mesh_pb2.GetPluginRequest, context: Context
    ) -> mesh_pb2.GetPluginResponse:
        """One plugin; ``NOT_FOUND`` naming the closest names."""
        await self._require_read(context, "GetPlugin")
        plugin = self._plugins.get(request.name)
        if plugin is None:
            close = difflib.get_close_matches(request.name, list(self._plugins), n=3, cutoff=0.4)
            hint = (
                f"did you mean {', '.join(map(repr, close))}?"
                if close
                else (f"known plugins: {', '.join(sorted(self._plugins)) or 'none'}")
            )
            await NotFoundError(
                f"no plugin named {request.name!r}; {hint}", reason="TARGET_NOT_FOUND"
            ).abort(context)
        return mesh_pb2.GetPluginResponse(plugin=self.plugin_status(plugin))

    async def ListAgents(
        self, request: mesh_pb2.ListAgentsRequest, context: Context
    ) -> mesh_pb2.ListAgentsResponse:
        """Agents, filtered by plugin and capability."""
        agents = self._catalog.agents(request.plugin, request.capability)
        return mesh_pb2.ListAgentsResponse(agents=self._listed(context, "agent", agents))

    async def GetAgent(
        self, request: mesh_pb2.GetAgentRequest, context: Context
    ) -> mesh_pb2.GetAgentResponse:
        """One agent by qualified or unique short name."""
        try:
            entry = self._catalog.agent(request.name)
        except SidemeshError as err:
            await err.abort(context)
        await self._visible(context, "agent", entry.qualified)
        return mesh_pb2.GetAgentResponse(agent=entry.descriptor)

    async def ListTools(
        self, request: mesh_pb2.MeshServiceListToolsRequest, context: Context
    ) -> mesh_pb2.MeshServiceListToolsResponse:
        """Tools, filtered by plugin and a text query."""
        tools = self._catalog.tools(request.plugin, request.query)
        return mesh_pb2.MeshServiceListToolsResponse(tools=self._listed(context, "tool", tools))

    async def GetTool(
        self, request: mesh_pb2.GetToolRequest, context: Context
    ) -> mesh_pb2.GetToolResponse:
        """One tool by qualified or unique short name."""
        try:
            entry = self._catalog.tool(request.name)
        except SidemeshError as err:
            await err.abort(context)
        await self._visible(context, "tool", entry.qualified)
        return mesh_pb2.GetToolResponse(tool=entry.descriptor)

    async def WatchEvents(
        self, request: mesh_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[mesh_pb2.WatchEventsResponse]:
        """The event stream, until the client leaves or the orchestrator stops."""
        await self._require_read(context, "WatchEvents")
        async for event in self._events.subscribe(
            plugin=request.plugin, lifecycle_only=request.lifecycle_only, replay=request.replay
        ):
            yield event

    async def ListTraces(
        self, request: mesh_pb2.ListTracesRequest, context: Context
    ) -> mesh_pb2.ListTracesResponse:
        """Recent traces from the embedded store, newest first."""
        await self._require_read(context, "ListTraces")
        store = await self._store(context)
        return mesh_pb2.ListTracesResponse(traces=await store.recent(request.limit, request.plugin))

    async def GetTrace(
        self, request: mesh_pb2.GetTraceRequest, context: Context
    ) -> mesh_pb2.GetTraceResponse:
        """Every span of one trace."""
        await self._require_read(context, "GetTrace")
        store = await self._store(context)
        try:
            spans, omitted = await store.spans(request.trace_id)
        except SidemeshError as err:
            await err.abort(context)
        return mesh_pb2.GetTraceResponse(spans=spans, spans_omitted=omitted)

    async def _store(self, context: Context) -> TraceStore:
        if self._traces is None:
            await FailedPreconditionError(
                "tracing is off in this mesh (telemetry.enabled: false in its config)",
                reason="TRACING_DISABLED",
            ).abort(context)
        assert self._traces is not None
        return self._traces


def visible_to(
    context: Context,
    kind: str,
    items: list[T],
    own: OwnAccess | None,
    plugins: Mapping[str, PluginRuntime],
) -> list[T]:
    """The agent or tool descriptors the caller of ``context`` may call."""
    if own is not None:
        return own.visible(context, kind, items, key=lambda d: d.qualified_name)  # type: ignore[attr-defined]
    caller = caller_of(context, plugins)
    if caller is None:
        return items
    return [d for d in items if caller.may_call(kind, d.qualified_name)]  # type: ignore[attr-defined]


def tool_listing(
    catalog: Catalog, plugins: Mapping[str, PluginRuntime], own: OwnAccess | None = None
) -> grpc.GenericRpcHandler:
    """``ToolService.ListTools`` (the data plane routes ``CallTool``): a plugin sees only
    the tools it may call."""

    async def list_tools(
        request: tool_pb2.ListToolsRequest, context: Context
    ) -> tool_pb2.ListToolsResponse:
        tools = catalog.tools(plugin=request.plugin)
        return tool_pb2.ListToolsResponse(tools=visible_to(context, "tool", tools, own, plugins))

    handler = grpc.unary_unary_rpc_method_handler(
        list_tools,
        request_deserializer=tool_pb2.ListToolsRequest.FromString,
        response_serializer=tool_pb2.ListToolsResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("sidemesh.v1.ToolService", {"ListTools": handler})
