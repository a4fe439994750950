"""A small in-process stand-in for the orchestrator's callback socket, for ``PluginHarness``.

It serves ``ToolService``, ``AgentService`` and the catalog part of
``MeshService`` for a few in-process apps, routing ``plugin/name`` or a unique
short name to the app's own servicers and setting the caller as the
orchestrator would. Each routed call gets the SERVER span the target app's
sidecar would make, so a harness trace looks like the mesh's minus the
orchestrator's own spans. It does not sandbox, check manifest permissions, retry or
balance: the real orchestrator does that.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from plugins_sdk._agent_service import AgentServicer
from plugins_sdk._chat import AgentChat, first_message
from plugins_sdk._context import CallInfo
from plugins_sdk._failures import end_call
from plugins_sdk._interceptors import CallInput
from plugins_sdk._runtime import AppRuntime
from plugins_sdk._tool_service import ToolServicer
from sidemesh.core import InvalidArgumentError, NotFoundError, TargetIndex, UnimplementedError
from sidemesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    tool_pb2,
    tool_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class _Member:
    runtime: AppRuntime
    tools: ToolServicer
    agents: AgentServicer


class Routes:
    """Qualified and short names of the apps' tools and agents."""

    def __init__(self, runtimes: Iterable[AppRuntime], caller: str) -> None:
        self.caller = caller
        self.members = {r.app.name: _Member(r, ToolServicer(r), AgentServicer(r)) for r in runtimes}
        self._indexes: dict[str, TargetIndex[tuple[_Member, str]]] = {}
        for kind in ("tool", "agent"):
            index: TargetIndex[tuple[_Member, str]] = TargetIndex(kind)
            index.rebuild(
                (plugin, name, (member, name))
                for plugin, member in self.members.items()
                for name in self._names(member, kind)
            )
            self._indexes[kind] = index

    def resolve(self, kind: str, target: str) -> tuple[_Member, str]:
        """The app and plugin-local name ``target`` names, resolved as the orchestrator
        resolves it (``sidemesh.core.TargetIndex``): the same errors, the same hints."""
        return self._indexes[kind].resolve(target)

    def qualified(self, kind: str) -> list[str]:
        """Every ``plugin/name`` of ``kind`` (``tool`` or ``agent``), sorted."""
        return list(self._indexes[kind].by_qualified)

    @staticmethod
    def _names(member: _Member, kind: str) -> Iterable[str]:
        app = member.runtime.app
        return app.tools if kind == "tool" else app.agents

    def info(self, context: Context) -> CallInfo:
        """The call's facts, with the caller set as the orchestrator sets it on callbacks."""
        info = CallInfo.from_grpc(context)
        info.caller = self.caller
        return info


class EndpointTools(tool_pb2_grpc.ToolServiceServicer):
    """``ToolService`` over all the apps."""

    def __init__(self, routes: Routes) -> None:
        self._routes = routes

    async def ListTools(
        self, request: tool_pb2.ListToolsRequest, context: Context
    ) -> tool_pb2.ListToolsResponse:
        """Every app's tools, qualified."""
        return tool_pb2.ListToolsResponse(tools=_tools(self._routes, request.plugin, ""))

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: Context
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        """Routes the call to the app that owns the tool."""
        info = self._routes.info(context)
        what = f"tool {request.tool!r}"
        try:
            member, name = self._routes.resolve("tool", request.tool)
        except Exception as error:
            await end_call(context, error, what, info.call_id)
        local = tool_pb2.CallToolRequest(tool=name, arguments=request.arguments)
        call = member.tools.chain.input("CallTool", context, name, what, info=info)
        async with aclosing(member.tools.serve_call(local, call)) as responses:
            async for response in responses:
                yield response


class EndpointAgents(agent_pb2_grpc.AgentServiceServicer):
    """``AgentService`` over all the apps."""

    def __init__(self, routes: Routes) -> None:
        self._routes = routes

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: Context
    ) -> AsyncIterator[agent_pb2.InvokeResponse]:
        """Routes the turn to the app that owns the agent."""
        info = self._routes.info(context)
        what = f"agent {request.agent or request.capability!r}"
        try:
            member, name = self._resolve(request.agent, request.capability)
        except Exception as error:
            await end_call(context, error, what, info.call_id)
        local = agent_pb2.InvokeRequest()
        local.CopyFrom(request)
        local.agent, local.capability = name, ""
        call = member.agents.chain.input("Invoke", context, name, what, info=info)
        async with aclosing(member.agents.serve_invoke(local, call)) as responses:
            async for response in responses:
                yield response

    async def Chat(
        self, request_iterator: AsyncIterator[agent_pb2.ChatRequest], context: Context
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        """Routes the conversation to the app that owns the agent."""
        info = self._routes.info(context)
        try:
            start = await first_message(request_iterator)
            member, name = self._resolve(start.agent, start.capability)
            spec = member.runtime.agent(name)
        except Exception as error:
            await end_call(context, error, "chat", info.call_id)

        def session(call: CallInput) -> AsyncGenerator[agent_pb2.ChatResponse, None]:
            chat = AgentChat(member.runtime, spec, start, call.info, call.started_span())
            return chat.run(request_iterator)

        chain = member.agents.chain
        call = chain.input("Chat", context, name, "chat", info=info)
        async with aclosing(chain.stream(call, session)) as responses:
            async for response in responses:
                yield response

    def _resolve(self, agent: str, capability: str) -> tuple[_Member, str]:
        if agent:
            return self._routes.resolve("agent", agent)
        for qualified in self._routes.qualified("agent"):
            member, name = self._routes.resolve("agent", qualified)
            if capability in member.runtime.app.agents[name].descriptor.capabilities:
                return member, name
        raise NotFoundError(f"no agent with capability {capability!r} in the harness mesh")


class EndpointCatalog(mesh_pb2_grpc.MeshServiceServicer):
    """The catalog part of ``MeshService``: list and get tools and agents."""

    def __init__(self, routes: Routes) -> None:
        self._routes = routes

    async def ListTools(
        self, request: mesh_pb2.MeshServiceListToolsRequest, context: Context
    ) -> mesh_pb2.MeshServiceListToolsResponse:
        """Every app's tools, qualified, filtered by plugin and query."""
        return mesh_pb2.MeshServiceListToolsResponse(
            tools=_tools(self._routes, request.plugin, request.query)
        )

    async def GetTool(
        self, request: mesh_pb2.GetToolRequest, context: Context
    ) -> mesh_pb2.GetToolResponse:
        """One tool's descriptor."""
        try:
            member, name = self._routes.resolve("tool", request.name)
        except (NotFoundError, InvalidArgumentError) as error:
            await error.abort(context)
        plugin = member.runtime.app.name
        return mesh_pb2.GetToolResponse(tool=_qualified_tool(plugin, name, member))

    async def ListAgents(
        self, request: mesh_pb2.ListAgentsRequest, context: Context
    ) -> mesh_pb2.ListAgentsResponse:
        """Every app's agents, qualified, filtered by plugin and capability."""
        agents = []
        for qualified in self._routes.qualified("agent"):
            member, name = self._routes.resolve("agent", qualified)
            descriptor = _qualified_agent(member, name)
            if request.plugin and descriptor.plugin != request.plugin:
                continue
            if request.capability and request.capability not in descriptor.capabilities:
                continue
            agents.append(descriptor)
        return mesh_pb2.ListAgentsResponse(agents=agents)

    async def GetAgent(
        self, request: mesh_pb2.GetAgentRequest, context: Context
    ) -> mesh_pb2.GetAgentResponse:
        """One agent's descriptor."""
        try:
            member, name = self._routes.resolve("agent", request.name)
        except (NotFoundError, InvalidArgumentError) as error:
            await error.abort(context)
        return mesh_pb2.GetAgentResponse(agent=_qualified_agent(member, name))

    async def ListPlugins(
        self, request: mesh_pb2.ListPluginsRequest, context: Context
    ) -> mesh_pb2.ListPluginsResponse:
        """Not in the harness: plugin status belongs to the orchestrator."""
        await _unimplemented(context, "ListPlugins")

    async def GetPlugin(
        self, request: mesh_pb2.GetPluginRequest, context: Context
    ) -> mesh_pb2.GetPluginResponse:
        """Not in the harness: plugin status belongs to the orchestrator."""
        await _unimplemented(context, "GetPlugin")

    async def WatchEvents(
        self, request: mesh_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[mesh_pb2.WatchEventsResponse]:
        """Not in the harness: mesh events belong to the orchestrator."""
        await _unimplemented(context, "WatchEvents")
        yield mesh_pb2.WatchEventsResponse()  # pragma: no cover - makes this a generator

    async def ListTraces(
        self, request: mesh_pb2.ListTracesRequest, context: Context
    ) -> mesh_pb2.ListTracesResponse:
        """Not in the harness: the trace store belongs to the orchestrator."""
        await _unimplemented(context, "ListTraces")

    async def GetTrace(
        self, request: mesh_pb2.GetTraceRequest, context: Context
    ) -> mesh_pb2.GetTraceResponse:
        """Not in the harness: the trace store belongs to the orchestrator."""
        await _unimplemented(context, "GetTrace")


async def _unimplemented(context: Context, method: str) -> NoReturn:
    await UnimplementedError(
        f"MeshService.{method} is served by the orchestrator, not by PluginHarness"
    ).abort(context)


def _qualified_tool(plugin: str, name: str, member: _Member) -> tool_pb2.ToolDescriptor:
    descriptor = tool_pb2.ToolDescriptor()
    descriptor.CopyFrom(member.runtime.app.tools[name].descriptor)
    descriptor.plugin, descriptor.qualified_name = plugin, f"{plugin}/{name}"
    return descriptor


def _qualified_agent(member: _Member, name: str) -> agent_pb2.AgentDescriptor:
    plugin = member.runtime.app.name
    descriptor = agent_pb2.AgentDescriptor()
    descriptor.CopyFrom(member.runtime.app.agents[name].descriptor)
    descriptor.plugin, descriptor.qualified_name = plugin, f"{plugin}/{name}"
    return descriptor


def _tools(routes: Routes, plugin: str, query: str) -> list[tool_pb2.ToolDescriptor]:
    out = []
    for qualified in routes.qualified("tool"):
        member, name = routes.resolve("tool", qualified)
        descriptor = _qualified_tool(member.runtime.app.name, name, member)
        if plugin and descriptor.plugin != plugin:
            continue
        text = f"{descriptor.name}\n{descriptor.title}\n{descriptor.description}".lower()
        if query and query.lower() not in text:
            continue
        out.append(descriptor)
    return out


def add_endpoint(server: grpc.aio.Server, routes: Routes) -> None:
    """Adds the endpoint's services to ``server``."""
    tool_pb2_grpc.add_ToolServiceServicer_to_server(EndpointTools(routes), server)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(EndpointAgents(routes), server)
    mesh_pb2_grpc.add_MeshServiceServicer_to_server(EndpointCatalog(routes), server)
