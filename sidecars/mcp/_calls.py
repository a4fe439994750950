"""What every bridged call shares: its deadline, its span, and the tool call's event stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from plugins_sdk.serving import CallInput, CallSpan, Chain, Event, EventPump, ServerSpans, response
from sidecars.mcp import _convert as convert
from sidecars.mcp._arguments import check_arguments
from sidecars.mcp._asking import CallSlot
from sidecars.mcp._link import ServerLink
from sidemesh.core import struct_to_dict

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
M = TypeVar("M", bound=Message)
#: ``time_remaining()`` above this means the call has no deadline.
_NO_DEADLINE = 1e8


def call_timeout(context: Context, link: ServerLink) -> float:
    """The MCP request timeout: what is left of the gRPC deadline, else ``request_timeout``."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < _NO_DEADLINE:
        return max(0.0, remaining)
    return link.spec.request_timeout


def server_chain(link: ServerLink, service: str) -> Chain:
    """The SDK's interceptors (SERVER spans named after the plugin and versioned like its MCP
    server; failures as statuses) around each call to ``service``."""
    return Chain(ServerSpans(link.plugin, link.info.version or "0.0.0", service))


async def unary(
    chain: Chain,
    method: str,
    context: Context,
    target: str,
    body: Callable[[float], Awaitable[R]],
    link: ServerLink,
) -> R:
    """Runs ``body(timeout)`` through the chain: in the call's SERVER span, a failure ending the
    call with its status."""

    async def handler(call: CallInput) -> R:
        return await body(call_timeout(context, link))

    call = chain.input(method, context, target, f"{method} {target}".strip())
    result: R = await chain.unary(call, handler)
    return result


async def stream_tool_call(
    chain: Chain,
    link: ServerLink,
    context: Context,
    name: str,
    arguments: struct_pb2.Struct,
    response_cls: type[M],
    *,
    answers: frozenset[str] | None = None,
    on_slot: Callable[[CallSlot], None] | None = None,
    method: str = "CallTool",
) -> AsyncGenerator[M, None]:
    """A whole ``CallTool`` (of ToolService or McpService): its SERVER span, its deadline,
    its events as ``response_cls`` messages; a failure ends the call with its status.

    ``answers``: the server requests the caller can answer (``CallToolInteractive``;
    ``None`` for a plain ``CallTool``);
    ``on_slot`` receives the call's slot, to deliver the answers to."""
    timeout = call_timeout(context, link)

    async def handler(call: CallInput) -> AsyncGenerator[M, None]:
        span = call.started_span()
        events = tool_call_events(link, name, arguments, timeout, span, answers, on_slot)
        async with aclosing(events):
            async for event in events:
                yield response(response_cls, event)

    call = chain.input(method, context, name, f"tool {name!r}")
    async with aclosing(chain.stream(call, handler)) as responses:
        async for message in responses:
            yield message


async def tool_call_events(
    link: ServerLink,
    name: str,
    arguments: struct_pb2.Struct,
    timeout: float,
    span: CallSpan,
    answers: frozenset[str] | None = None,
    on_slot: Callable[[CallSlot], None] | None = None,
) -> AsyncGenerator[Event, None]:
    """A tool call's events: the server's progress, in order, then its result.

    Arguments are checked against the tool's input schema first. The MCP
    request runs in its own task, with the call's span current (the SDK
    passes its trace context on in ``_meta``); if the gRPC call ends early,
    closing this generator cancels the task, and the SDK sends the server
    ``notifications/cancelled``. While it runs, the call is in flight on the
    link: the server's requests and log messages can find it (``_asking``).
    """
    entry = link.catalog.tool(name)
    tool = entry.tool.name
    span.set_target(tool)
    values = struct_to_dict(arguments)
    check_arguments(tool, entry.validator, values)
    pump = EventPump()
    slot = CallSlot(
        tool, answers or frozenset(), pump.emit, pump.offer, interactive=answers is not None
    )
    if on_slot is not None:
        on_slot(slot)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        # The MCP session cannot wait for a slow caller: progress it cannot take is dropped
        # (the next one says more), never queued without bound.
        pump.offer(("progress", convert.progress(progress, total, message)))

    async def run() -> Event:
        with link.in_flight.call(slot):
            result = await link.request(
                f"tool {tool!r}",
                lambda client, seconds: client.call_tool(
                    tool, values, read_timeout_seconds=seconds, progress_callback=on_progress
                ),
                timeout,
            )
        proto = convert.tool_result(result)
        span.tool_result(proto)
        return ("result", proto)

    with span.current():
        pump.start(run())
    try:
        while (event := await pump.next()) is not None:
            yield event
    finally:
        await pump.close()
