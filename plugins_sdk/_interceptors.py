"""Interceptors: the hooks around every call a sidecar serves.

Each hook takes one input object, :class:`CallInput`, and calls ``next`` with
it to go on (as temporalio's interceptors do), so fields can be added to the
input without breaking an interceptor. :class:`ServeCall`, the outermost
interceptor of every chain, is what all servicers share: it starts the call's
SERVER span, makes a failure the call's status (:func:`end_call`) and counts
the messages sent. A plugin's own interceptors (``Plugin(interceptors=...)``)
run inside it, in the order given: they see the span, may read or annotate the
call, and reject it by raising a ``SidemeshError``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from plugins_sdk._context import CallInfo
from plugins_sdk._failures import end_call
from plugins_sdk._tracing import CallSpan, ServerSpans

Context = grpc.aio.ServicerContext[Any, Any]
#: What a unary hook calls to go on, and what a streaming hook calls.
UnaryNext = Callable[["CallInput"], Awaitable[Any]]
StreamNext = Callable[["CallInput"], AsyncGenerator[Any, None]]


@dataclass(slots=True)
class CallInput:
    """One call being served, as every interceptor of its chain sees it."""

    #: The gRPC service, ``sidemesh.v1.ToolService``.
    service: str
    #: The method, ``CallTool``.
    method: str
    #: The call's id, caller, deadline and metadata.
    info: CallInfo
    #: The call's gRPC context (for metadata to send, or ``abort``).
    context: Context
    #: The tool or agent the request names, ``""`` when it names none (yet).
    target: str = ""
    #: How a failure names the call (``tool 'add'``); the method when empty.
    what: str = ""
    #: The call's SERVER span, once :class:`ServeCall` has started it.
    span: CallSpan | None = None

    def started_span(self) -> CallSpan:
        """The call's span, for handlers (which run inside :class:`ServeCall`)."""
        assert self.span is not None, "ServeCall starts the span before any handler runs"
        return self.span


class Interceptor:
    """A hook around calls; override ``unary`` and/or ``stream``, each calling ``next``.

    ``unary`` wraps calls with one response (``ListTools``), ``stream`` those
    whose responses are a stream (``CallTool``, ``Invoke``, ``Chat``). Raise a
    ``SidemeshError`` to reject a call with its status.
    """

    async def unary(self, input: CallInput, next: UnaryNext) -> Any:
        """Runs a unary call: ``return await next(input)``, with work around it."""
        return await next(input)

    def stream(self, input: CallInput, next: StreamNext) -> AsyncGenerator[Any, None]:
        """Runs a streaming call: returns ``next(input)``, or an async generator over it."""
        return next(input)


class ServeCall(Interceptor):
    """The outermost interceptor: the call's SERVER span, its status on failure, its count."""

    def __init__(self, spans: ServerSpans) -> None:
        self._spans = spans

    async def unary(self, input: CallInput, next: UnaryNext) -> Any:
        """Runs the call in its span, made current; a failure ends it with its status."""
        span = input.span = self._spans.start(input.method, input.info, input.target)
        try:
            with span, span.current():
                result = await next(input)
                span.messages = 1
                return result
        except Exception as error:
            await _fail(input, span, error)

    async def stream(self, input: CallInput, next: StreamNext) -> AsyncGenerator[Any, None]:
        """Streams the call's responses in its span; a failure ends it with its status.

        The span is not made current here (a generator may not keep a context
        across ``yield``); the handler makes it current where it runs code.
        """
        span = input.span = self._spans.start(input.method, input.info, input.target)
        try:
            with span:
                async with aclosing(next(input)) as messages:
                    async for message in messages:
                        span.messages += 1
                        yield message
        except Exception as error:
            await _fail(input, span, error)


async def _fail(input: CallInput, span: CallSpan, error: Exception) -> NoReturn:
    await end_call(input.context, error, input.what or input.method, input.info.call_id, span=span)


class Chain:
    """One service's interceptors, :class:`ServeCall` first, around each call's handler."""

    def __init__(self, spans: ServerSpans, interceptors: Sequence[Interceptor] = ()) -> None:
        #: The gRPC service the chain serves.
        self.service = spans.service
        self._interceptors = (ServeCall(spans), *interceptors)

    def input(
        self, method: str, context: Context, target: str = "", what: str = "", *,
        info: CallInfo | None = None,
    ) -> CallInput:  # fmt: skip
        """The input of one call to ``method`` (its info read from ``context`` unless given)."""
        info = info if info is not None else CallInfo.from_grpc(context)
        return CallInput(self.service, method, info, context, target, what)

    async def unary(self, input: CallInput, handler: UnaryNext) -> Any:
        """Runs ``handler(input)`` through the chain."""
        call = handler
        for interceptor in reversed(self._interceptors):
            call = _unary_step(interceptor, call)
        return await call(input)

    def stream(self, input: CallInput, handler: StreamNext) -> AsyncGenerator[Any, None]:
        """Streams ``handler(input)`` through the chain."""
        call = handler
        for interceptor in reversed(self._interceptors):
            call = _stream_step(interceptor, call)
        return call(input)


def _unary_step(interceptor: Interceptor, next: UnaryNext) -> UnaryNext:
    return lambda input: interceptor.unary(input, next)


def _stream_step(interceptor: Interceptor, next: StreamNext) -> StreamNext:
    return lambda input: interceptor.stream(input, next)
