"""``AgentService`` of a sidecar: runs the plugin's agents (``Invoke``; ``Chat`` in ``_chat``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from plugins_sdk._agents import AgentSpec
from plugins_sdk._chat import AgentChat, first_message
from plugins_sdk._context import (
    AgentContext,
    CallInfo,
    Emit,
    Event,
    mark_cancelled,
    response,
)
from plugins_sdk._interceptors import CallInput, Chain, StreamNext
from plugins_sdk._pump import EventPump
from plugins_sdk._runtime import AppRuntime
from plugins_sdk._tracing import CallSpan, ServerSpans
from sidemesh.core import InvalidArgumentError, struct_to_dict
from sidemesh.v1 import agent_pb2, agent_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "sidemesh.v1.AgentService"


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serves one plugin's agents."""

    def __init__(self, runtime: AppRuntime) -> None:
        self._runtime = runtime
        #: The interceptors around each call: its span and its status first.
        self.chain = Chain(
            ServerSpans(runtime.app.name, runtime.app.version, SERVICE), runtime.app.interceptors
        )

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: Context
    ) -> AsyncIterator[agent_pb2.InvokeResponse]:
        """Runs one turn and streams its events, the last one its result."""
        what = f"agent {request.agent or request.capability!r}"
        call = self.chain.input("Invoke", context, request.agent, what)
        async with aclosing(self.serve_invoke(request, call)) as responses:
            async for response in responses:
                yield response

    def serve_invoke(
        self, request: agent_pb2.InvokeRequest, call: CallInput
    ) -> AsyncGenerator[agent_pb2.InvokeResponse, None]:
        """One ``Invoke`` through the interceptors (the harness's router calls it too)."""
        return self.chain.stream(
            call, lambda call: self.invoke(request, call.info, call.started_span())
        )

    async def invoke(
        self, request: agent_pb2.InvokeRequest, info: CallInfo, span: CallSpan
    ) -> AsyncGenerator[agent_pb2.InvokeResponse, None]:
        """The events of one turn; raises ``SidemeshError`` or what the agent raised.

        The turn runs with ``span`` current, which the caller keeps open.
        """
        spec = self.resolve(request.agent, request.capability)
        span.set_target(spec.name)
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
        with span.current():
            pump.start(
                run_turn(spec, arg, ctx, pump.emit, span), on_cancel=lambda: mark_cancelled(ctx)
            )
        try:
            while (event := await pump.next()) is not None:
                yield response(agent_pb2.InvokeResponse, event)
        finally:
            await pump.close()

    async def Chat(
        self, request_iterator: AsyncIterator[agent_pb2.ChatRequest], context: Context
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        """A conversation: each input starts a turn, or feeds the running one."""
        async with aclosing(
            self.chain.stream(
                self.chain.input("Chat", context, what="chat"), self._chat(request_iterator)
            )
        ) as responses:
            async for response in responses:
                yield response

    def _chat(self, request_iterator: AsyncIterator[agent_pb2.ChatRequest]) -> StreamNext:
        async def handler(call: CallInput) -> AsyncGenerator[agent_pb2.ChatResponse, None]:
            start = await first_message(request_iterator)
            call.what = f"agent {start.agent or start.capability!r}"
            spec = self.resolve(start.agent, start.capability)
            span = call.started_span()
            span.set_target(spec.name)
            session = AgentChat(self._runtime, spec, start, call.info, span)
            async with aclosing(session.run(request_iterator)) as events:
                async for event in events:
                    yield event

        return handler

    def resolve(self, agent: str, capability: str) -> AgentSpec:
        """The agent a request names, or the first with its capability."""
        if agent:
            return self._runtime.agent(agent)
        if capability:
            return self._runtime.agent_by_capability(capability)
        raise InvalidArgumentError(
            "name the agent ('agent') or give a 'capability'", reason="INVALID_TARGET"
        )


async def run_turn(
    spec: AgentSpec, arg: Any, ctx: AgentContext, emit: Emit, span: CallSpan
) -> Event:
    """One turn as a pump handler: its events are emitted, its result returned last."""
    result = await spec.run(arg, ctx, emit)
    span.agent_result(result)
    return ("result", result)
