"""One ``tools/call`` of an MCP client, made through the mesh.

- A tool of an MCP plugin goes through ``McpService.CallToolInteractive``:
  the bridged server's sampling, elicitation and roots requests come back on
  the call's stream and are sent to the MCP client that made the call (on
  the request's own stream, so streamable HTTP carries them on its SSE
  response), its answers go back the same way. A 2026 client gets them as an
  ``input_required`` result instead, and retries with its answers
  (:class:`ParkedCalls`). The client's declared capabilities say which it can
  answer; the bridge refuses the others with a clear error.
- Any other tool goes through ``ToolService.CallTool``; an agent through
  ``AgentService.Invoke``.

Progress events are MCP progress notifications (when the client sent a
token), log events are ``notifications/message`` of the request, a tool's
``is_error`` is ``isError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from google.protobuf import json_format
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from clients import AsyncMeshClient, McpRequestError, McpToolCall
from orchestrator.gateway import _convert as convert
from orchestrator.gateway._catalog import Target
from sidemesh.core import struct_to_dict
from sidemesh.v1 import agent_pb2, common_pb2, mcp_pb2

#: Seconds a 2026 client has to retry a call that answered ``input_required``.
PARK_TIMEOUT = 120.0
#: Server request method -> (SDK request model, its result model, client capability name).
_SERVER_REQUESTS: dict[str, tuple[type[Any], type[BaseModel], str]] = {
    "sampling/createMessage": (types.CreateMessageRequest, types.CreateMessageResult, "sampling"),
    "elicitation/create": (types.ElicitRequest, types.ElicitResult, "elicitation"),
    "roots/list": (types.ListRootsRequest, types.ListRootsResult, "roots"),
}


def _modern(ctx: ServerRequestContext[Any]) -> bool:
    """A 2026 client: no server-to-client requests, ``input_required`` results instead."""
    return ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS


def client_can_answer(ctx: ServerRequestContext[Any]) -> dict[str, bool]:
    """Which server requests the calling MCP client can answer on this request."""
    caps = ctx.session.client_capabilities
    if caps is None or not (ctx.session.can_send_request or _modern(ctx)):
        return {"sampling": False, "elicitation": False, "roots": False}
    return {
        "sampling": caps.sampling is not None,
        "elicitation": caps.elicitation is not None,
        "roots": caps.roots is not None,
    }


@dataclass
class _Parked:
    stream: McpToolCall
    principal: str
    timer: asyncio.TimerHandle


class ParkedCalls:
    """Calls of 2026 clients waiting for the client to retry with its input responses.

    A 2026 client cannot be sent a request; the tool call answers
    ``input_required`` with the server's request and an opaque
    ``request_state``, and the mesh call stays open (on its one replica)
    until the client retries with the answer, or ``PARK_TIMEOUT`` passes.
    """

    def __init__(self) -> None:
        self._calls: dict[str, _Parked] = {}

    def park(self, stream: McpToolCall, principal: str) -> str:
        token = secrets.token_urlsafe(24)
        timer = asyncio.get_running_loop().call_later(PARK_TIMEOUT, self._expire, token)
        self._calls[token] = _Parked(stream, principal, timer)
        return token

    def resume(self, token: str, principal: str) -> McpToolCall | None:
        parked = self._calls.get(token)
        if parked is None or parked.principal != principal:
            return None
        del self._calls[token]
        parked.timer.cancel()
        return parked.stream

    def _expire(self, token: str) -> None:
        parked = self._calls.pop(token, None)
        if parked is not None:
            parked.stream.cancel()

    def close(self) -> None:
        for token in list(self._calls):
            self._expire(token)


async def call_mcp_tool(
    mesh: AsyncMeshClient,
    ctx: ServerRequestContext[Any],
    target: Target,
    params: types.CallToolRequestParams,
    parked: ParkedCalls,
    principal: str,
) -> types.CallToolResult | types.InputRequiredResult:
    """A tool of an MCP plugin, its server's requests answered by the MCP client."""
    stream: McpToolCall | None = None
    if params.request_state:
        stream = parked.resume(params.request_state, principal)
        if stream is None:
            raise MCPError(types.INVALID_PARAMS, "unknown or expired requestState")
        for request_id, response in (params.input_responses or {}).items():
            answer = response.model_dump(by_alias=True, mode="json", exclude_none=True)
            await stream.answer(request_id, answer)
    else:
        can = client_can_answer(ctx)
        if not any(can.values()):
            # Nothing to answer: the plain call is cheaper (a server stream, not a bidi one),
            # and the bridge refuses the server's requests for this caller just the same.
            return await call_tool(mesh, ctx, target, params.arguments or {})
        stream = mesh.call_mcp_tool_stream(
            target.plugin, target.local_name, params.arguments or {},
            sampling=can["sampling"], elicitation=can["elicitation"], roots=can["roots"],
        )  # fmt: skip
    keep = False
    try:
        async for event in stream:
            kind = event.WhichOneof("event")
            if kind == "progress":
                await progress(ctx, event.progress)
            elif kind == "log":
                await log(ctx, event.log)
            elif kind == "server_request" and _modern(ctx):
                request = _sdk_request(event.server_request)
                if request is None:
                    error = _refusal(f"unknown request {event.server_request.method}")
                    await stream.answer(event.server_request.id, error=error)
                    continue
                keep = True
                token = parked.park(stream, principal)
                return types.InputRequiredResult(
                    input_requests={event.server_request.id: request}, request_state=token
                )
            elif kind == "server_request":
                await _forward(ctx, stream, event.server_request)
    finally:
        if not keep:
            stream.cancel()  # a no-op once ended; stops the mesh call if the client cancelled
    assert stream.result is not None  # the stream raises when it ends without one
    return convert.tool_result(stream.result.raw)


def _sdk_request(request: mcp_pb2.McpServerRequest) -> Any:
    known = _SERVER_REQUESTS.get(request.method)
    if known is None:
        return None
    params = struct_to_dict(request.params)
    return known[0].model_validate({"method": request.method, "params": params})


async def call_tool(
    mesh: AsyncMeshClient, ctx: ServerRequestContext[Any], target: Target, args: dict[str, Any]
) -> types.CallToolResult:
    """A tool of a plugin of the mesh."""
    stream = mesh.call_tool_stream(target.qualified, args)
    try:
        async for event in stream:
            kind = event.WhichOneof("event")
            if kind == "progress":
                await progress(ctx, event.progress)
            elif kind == "log":
                await log(ctx, event.log)
    finally:
        stream.cancel()
    assert stream.result is not None
    return convert.tool_result(stream.result.raw)


async def invoke(
    mesh: AsyncMeshClient, ctx: ServerRequestContext[Any], target: Target, args: dict[str, Any]
) -> types.CallToolResult:
    """An agent's turn: its answer as text, its structured outputs as ``{"outputs": [...]}``."""
    text, data = args.get("text", ""), args.get("data")
    if not isinstance(text, str) or not (data is None or isinstance(data, dict)):
        return error_result("an agent takes 'text' (a string) and optionally 'data' (an object)")
    agent_input = agent_pb2.AgentInput(text=text)
    if data:
        json_format.ParseDict(data, agent_input.data)
    stream = mesh.invoke(target.qualified, agent_input)
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
                await progress(ctx, event.progress)
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


def error_result(message: str) -> types.CallToolResult:
    """A tool result the model reads and can correct itself by (``isError``)."""
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


async def progress(ctx: ServerRequestContext[Any], event: common_pb2.Progress) -> None:
    """A mesh progress event as an MCP progress notification (a no-op without a token)."""
    total = event.total if event.HasField("total") else None
    with contextlib.suppress(Exception):  # a client gone away (or a task's ended request)
        await ctx.session.report_progress(event.progress, total, event.message or None)


async def log(ctx: ServerRequestContext[Any], record: common_pb2.LogRecord) -> None:
    """A log event of the call as the request's ``notifications/message`` (not when the
    request is answered with one JSON body, which has no wire for it)."""
    if not ctx.session.can_send_request and not _modern(ctx):
        return
    data: Any = record.message
    if record.HasField("data"):
        data = {"message": record.message, **struct_to_dict(record.data)}
    with warnings.catch_warnings():  # logging is deprecated in 2026, still served to 2025
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):  # a client gone away misses its log lines
            await ctx.session.send_log_message(
                convert.log_level(record.level), data, record.logger or None,
                related_request_id=ctx.request_id,
            )  # fmt: skip


async def _forward(
    ctx: ServerRequestContext[Any], stream: McpToolCall, request: mcp_pb2.McpServerRequest
) -> None:
    """Sends the bridged server's request to the MCP client; its answer back to the server."""
    known = _SERVER_REQUESTS.get(request.method)
    if known is None:
        await stream.answer(request.id, error=_refusal(f"unknown request {request.method}"))
        return
    request_cls, result_cls, _ = known
    params = struct_to_dict(request.params)
    try:
        sdk_request = request_cls.model_validate({"method": request.method, "params": params})
        result = await ctx.session.send_request(
            sdk_request, result_cls,
            metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
        )  # fmt: skip
    except MCPError as err:
        await stream.answer(request.id, error=McpRequestError(err.code, err.message))
        return
    except Exception as err:  # the client went away, or answered nonsense
        await stream.answer(request.id, error=_refusal(f"the MCP client failed: {err}"))
        return
    await stream.answer(
        request.id, result.model_dump(by_alias=True, mode="json", exclude_none=True)
    )


def _refusal(message: str) -> McpRequestError:
    return McpRequestError(types.INTERNAL_ERROR, message)
