"""OpenTelemetry for the client: a CLIENT span per call, and the W3C context in its metadata.

``tracing_interceptors(address)`` gives one ``grpc.aio`` interceptor per call
arity; ``AsyncMeshClient`` installs them unless ``tracing=False``. Each call
gets a CLIENT span ``{service}/{method}``, a child of the current context,
with the RPC semantic-convention attributes; the context of that span is
injected into the call's metadata (``traceparent``, ``tracestate``,
``baggage``), replacing any such keys already there; the span ends when the
call does, with ``rpc.grpc.status_code`` and, for any code but ``OK``, status
``ERROR``.

This module needs ``opentelemetry-api`` only. Without an SDK the spans are
non-recording and the interceptors only propagate the current context (a
parent extracted from an incoming call, say), so a trace passes through
processes that do not record it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from sidemesh.core import normalize_address

#: The instrumentation scope of the client's spans.
SCOPE = "sidemesh.clients"

_tracer = trace.get_tracer(SCOPE)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def tracing_interceptors(address: str) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that trace every call on a channel to ``address``.

    One per call arity (``grpc.aio`` files an interceptor under the first
    arity it implements). Put them before other interceptors so those see
    the injected metadata.
    """
    calls = _CallTracer(address)
    return [
        _UnaryUnary(calls),
        _UnaryStream(calls),
        _StreamUnary(calls),
        _StreamStream(calls),
    ]


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    """Sets a key to exactly one value, so that a key never travels twice."""

    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier.set_all(key, [value])


_SETTER = _MetadataSetter()


class _CallTracer:
    """Starts and ends the spans of the calls on one channel."""

    def __init__(self, address: str) -> None:
        self._server = server_attributes(address)
        #: Span name and attributes per method path, computed once per method.
        self._methods: dict[str | bytes, tuple[str, Attributes]] = {}

    def start(self, details: grpc.aio.ClientCallDetails) -> tuple[Span, grpc.aio.ClientCallDetails]:
        """Starts the call's span and returns it with the details to call with."""
        described = self._methods.get(details.method)
        if described is None:
            described = self._methods[details.method] = self._describe(details.method)
        name, attributes = described
        span = _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        # A copy: the caller may have passed a Metadata it goes on using.
        metadata = grpc.aio.Metadata(*details.metadata) if details.metadata else grpc.aio.Metadata()
        propagate.inject(metadata, context=trace.set_span_in_context(span), setter=_SETTER)
        return span, grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    def _describe(self, method: str | bytes) -> tuple[str, Attributes]:
        path = method.decode() if isinstance(method, bytes) else method
        service, _, name = path.lstrip("/").partition("/")
        return f"{service}/{name}", {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            **self._server,
        }

    async def intercept(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Runs one call under a span that ends when the call does."""
        span, details = self.start(details)
        try:
            call = await continuation(details, request)
        except BaseException as error:
            if span.is_recording():
                if not isinstance(error, grpc.aio.AioRpcError | asyncio.CancelledError):
                    span.record_exception(error)
                end_span(span, *_status_of_error(error))
            raise
        if span.is_recording():
            if call.done():
                _on_done(span, call)
            else:
                call.add_done_callback(partial(_on_done, span))
        return call


def _interceptor(base: type, method: str) -> Callable[[_CallTracer], Any]:
    """grpc.aio's interceptor class of one call kind (it wants one per kind), handing
    every call of that kind to the one ``_CallTracer``."""

    def __init__(self: Any, calls: _CallTracer) -> None:
        self._calls = calls

    async def intercept(
        self: Any, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._calls.intercept(continuation, details, request)

    return type(f"_Traced{base.__name__}", (base,), {"__init__": __init__, method: intercept})


_UnaryUnary = _interceptor(grpc.aio.UnaryUnaryClientInterceptor, "intercept_unary_unary")
_UnaryStream = _interceptor(grpc.aio.UnaryStreamClientInterceptor, "intercept_unary_stream")
_StreamUnary = _interceptor(grpc.aio.StreamUnaryClientInterceptor, "intercept_stream_unary")
_StreamStream = _interceptor(grpc.aio.StreamStreamClientInterceptor, "intercept_stream_stream")


def server_attributes(address: str) -> dict[str, str | int]:
    """``server.address``, ``server.port`` (TCP) and ``network.transport`` of an address."""
    address = normalize_address(address)
    if address.startswith("unix:"):
        return {"server.address": address[len("unix:") :], "network.transport": "unix"}
    host, _, port = address.rpartition(":")
    return {
        "server.address": host.strip("[]"),
        "server.port": int(port),
        "network.transport": "tcp",
    }


def end_span(span: Span, code: int, description: str) -> None:
    """Ends a call's span with its gRPC status: any code but ``OK`` is an error for a client."""
    span.set_attribute("rpc.grpc.status_code", code)
    if code != 0:
        span.set_status(Status(StatusCode.ERROR, description or _CODE_NAMES.get(code, str(code))))
    span.end()


def _on_done(span: Span, call: Any) -> None:
    # A done callback cannot await ``call.code()``. The status of a finished
    # ``grpc.aio`` call is on its Cython call (grpc's own code reads it there);
    # when a wrapper hides it, await the public API in a task instead.
    status = getattr(getattr(call, "_cython_call", None), "_status", None)
    if status is not None:
        code: int = status.code()
        end_span(span, code, status.details() if code else "")
    else:
        task = asyncio.get_running_loop().create_task(_end_from_call(span, call))
        _pending.add(task)
        task.add_done_callback(_pending.discard)


_pending: set[asyncio.Task[None]] = set()


async def _end_from_call(span: Span, call: Any) -> None:
    code: grpc.StatusCode = await call.code()
    end_span(span, code.value[0], await call.details())


def _status_of_error(error: BaseException) -> tuple[int, str]:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().value[0], error.details() or ""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.value[0], "the call was cancelled before it started"
    return grpc.StatusCode.UNKNOWN.value[0], f"{type(error).__name__}: {error}"
