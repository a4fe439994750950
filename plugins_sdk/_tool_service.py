"""``ToolService`` of a sidecar: lists the plugin's tools and runs tool calls."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from plugins_sdk._context import CallInfo, ToolContext, mark_cancelled, response
from plugins_sdk._interceptors import CallInput, Chain
from plugins_sdk._pump import EventPump
from plugins_sdk._runtime import AppRuntime
from plugins_sdk._tools import ToolSpec
from plugins_sdk._tracing import CallSpan, ServerSpans
from sidemesh.core import struct_to_dict
from sidemesh.v1 import tool_pb2, tool_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "sidemesh.v1.ToolService"


class ToolServicer(tool_pb2_grpc.ToolServiceServicer):
    """Serves one plugin's tools."""

    def __init__(self, runtime: AppRuntime) -> None:
        self._runtime = runtime
        #: The interceptors around each call: its span and its status first.
        self.chain = Chain(
            ServerSpans(runtime.app.name, runtime.app.version, SERVICE), runtime.app.interceptors
        )
        self._list = tool_pb2.ListToolsResponse(
            tools=sorted(
                (spec.descriptor for spec in runtime.app.tools.values()), key=lambda d: d.name
            )
        )

    async def ListTools(
        self, request: tool_pb2.ListToolsRequest, context: Context
    ) -> tool_pb2.ListToolsResponse:
        """The plugin's tools, by name; none when the request names another plugin."""

        async def handler(call: CallInput) -> tool_pb2.ListToolsResponse:
            if request.plugin and request.plugin != self._runtime.app.name:
                return tool_pb2.ListToolsResponse()
            return self._list

        response: tool_pb2.ListToolsResponse = await self.chain.unary(
            self.chain.input("ListTools", context), handler
        )
        return response

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: Context
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        """Validates the arguments, runs the tool, streams progress and logs, then the result."""
        call = self.chain.input("CallTool", context, request.tool, f"tool {request.tool!r}")
        async with aclosing(self.serve_call(request, call)) as responses:
            async for response in responses:
                yield response

    def serve_call(
        self, request: tool_pb2.CallToolRequest, call: CallInput
    ) -> AsyncGenerator[tool_pb2.CallToolResponse, None]:
        """One ``CallTool`` through the interceptors (the harness's router calls it too)."""
        return self.chain.stream(
            call, lambda call: self.call(request, call.info, call.started_span())
        )

    async def call(
        self, request: tool_pb2.CallToolRequest, info: CallInfo, span: CallSpan
    ) -> AsyncGenerator[tool_pb2.CallToolResponse, None]:
        """The events of one call; raises ``SidemeshError`` or what the tool raised.

        The tool runs with ``span`` current, which the caller keeps open.
        """
        spec = self._runtime.tool(request.tool)
        span.set_target(spec.name)
        kwargs = spec.bind(struct_to_dict(request.arguments))
        if not spec.takes_context:
            # No context, no events: run it in the call's own task, cheapest path.
            with span.current():
                result = await spec.run(kwargs, None)
            span.tool_result(result)
            yield tool_pb2.CallToolResponse(result=result)
            return
        pump = EventPump()
        ctx = ToolContext(self._runtime, spec.name, info, spec.logger, pump.emit)
        with span.current():
            pump.start(
                _result_event(spec, kwargs, ctx, span), on_cancel=lambda: mark_cancelled(ctx)
            )
        try:
            while (event := await pump.next()) is not None:
                yield response(tool_pb2.CallToolResponse, event)
        finally:
            await pump.close()


async def _result_event(
    spec: ToolSpec, kwargs: dict[str, Any], ctx: ToolContext, span: CallSpan
) -> tuple[str, tool_pb2.ToolResult]:
    result = await spec.run(kwargs, ctx)
    span.tool_result(result)
    return ("result", result)
