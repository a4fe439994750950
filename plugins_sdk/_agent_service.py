"""``AgentService`` of a sidecar: runs the plugin's agents (``Invoke``; ``Chat`` in ``_chat``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from clients import InvalidArgumentError
from plugins_sdk._agents import AgentSpec
from plugins_sdk._chat import ChatSession, first_message
from plugins_sdk._context import (
    AgentContext,
    CallInfo,
    Emit,
    Event,
    mark_cancelled,
    response,
)
from plugins_sdk._failures import end_call
from plugins_sdk._pump import EventPump
from plugins_sdk._runtime import PluginRuntime
from plugins_sdk._structs import struct_to_dict
from sidemesh.v1 import agent_pb2, agent_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serves one plugin's agents."""

    def __init__(self, runtime: PluginRuntime) -> None:
        self._runtime = runtime

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: Context
    ) -> AsyncIterator[agent_pb2.InvokeResponse]:
        """Runs one turn and streams its events, the last one its result."""
        info = CallInfo.from_grpc(context)
        try:
            async with aclosing(self.invoke(request, info)) as events:
                async for event in events:
                    yield event
        except Exception as error:
            what = f"agent {request.agent or request.capability!r}"
            await end_call(context, error, what, info.call_id)

    async def invoke(
        self, request: agent_pb2.InvokeRequest, info: CallInfo
    ) -> AsyncGenerator[agent_pb2.InvokeResponse, None]:
        """The events of one turn; raises ``SidemeshError`` or what the agent raised."""
        spec = self.resolve(request.agent, request.capability)
        given, arg = spec.parse_input(request.input)
        pump = EventPump()
        ctx = AgentContext(
            self._runtime,
            spec.name,
            info,
            spec.logger,
            pump.emit,
            input=given,
            session_id=request.session_id,
            options=struct_to_dict(request.options),
        )
        pump.start(run_turn(spec, arg, ctx, pump.emit), on_cancel=lambda: mark_cancelled(ctx))
        try:
            while (event := await pump.next()) is not None:
                yield response(agent_pb2.InvokeResponse, event)
        finally:
            await pump.close()

    async def Chat(
        self, request_iterator: AsyncIterator[agent_pb2.ChatRequest], context: Context
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        """A conversation: each input starts a turn, or feeds the running one."""
        info = CallInfo.from_grpc(context)
        what = "chat"
        try:
            start = await first_message(request_iterator)
            what = f"agent {start.agent or start.capability!r}"
            spec = self.resolve(start.agent, start.capability)
            session = ChatSession(self._runtime, spec, start, info)
            async with aclosing(session.run(request_iterator)) as events:
                async for event in events:
                    yield event
        except Exception as error:
            await end_call(context, error, what, info.call_id)

    def resolve(self, agent: str, capability: str) -> AgentSpec:
        """The agent a request names, or the first with its capability."""
        if agent:
            return self._runtime.agent(agent)
        if capability:
            return self._runtime.agent_by_capability(capability)
        raise InvalidArgumentError(
            "name the agent ('agent') or give a 'capability'", reason="INVALID_TARGET"
        )


async def run_turn(spec: AgentSpec, arg: Any, ctx: AgentContext, emit: Emit) -> Event:
    """One turn as a pump handler: its events are emitted, its result returned last."""
    return ("result", await spec.run(arg, ctx, emit))
