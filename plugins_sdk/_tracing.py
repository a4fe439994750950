"""SERVER spans: one per ``AgentService`` / ``ToolService`` call a plugin serves.

The caller's W3C context is extracted from the call's metadata and the span
covers the whole response stream. The servicers make it current in the task
that runs the plugin's handler, so callbacks through ``ctx.mesh`` become its
children (the client's interceptors inject the current context) and spans the
plugin starts with ``ctx.tracer`` nest under it. Only the OpenTelemetry API is
used: without an SDK the span is non-recording and just carries the caller's
context on to callbacks and log lines.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from plugins_sdk._context import CallInfo
from plugins_sdk._plugin import RUNTIME
from sidemesh.core import SidemeshError
from sidemesh.v1 import agent_pb2, tool_pb2

#: The instrumentation scope of the SDK's spans.
SCOPE = "sidemesh.plugins_sdk"
#: A call interrupted this close to its deadline (seconds) ended by the deadline.
_DEADLINE_SLACK = 0.01

_tracer = trace.get_tracer(SCOPE, RUNTIME.rpartition("/")[2])
_FAILED = agent_pb2.AGENT_RESULT_STATUS_FAILED


class ServerSpans:
    """Starts the SERVER spans of one plugin's calls to one service."""

    def __init__(self, plugin: str, version: str, service: str) -> None:
        #: The gRPC service whose calls these are, ``sidemesh.v1.ToolService``.
        self.service = service
        self._service = service
        self._plugin = {"sidemesh.plugin": plugin, "sidemesh.plugin.version": version}
        #: Span name and start attributes per method, built once.
        self._methods: dict[str, tuple[str, dict[str, Any]]] = {}

    def start(self, method: str, info: CallInfo, target: str = "") -> CallSpan:
        """Starts the span of one call to ``method``, a child of the caller's context."""
        described = self._methods.get(method)
        if described is None:
            described = self._methods[method] = (
                f"{self._service}/{method}",
                {
                    "rpc.system": "grpc",
                    "rpc.service": self._service,
                    "rpc.method": method,
                    **self._plugin,
                },
            )
        name, attributes = described
        parent = propagate.extract(info.metadata)
        span = _tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        call = CallSpan(span, trace.set_span_in_context(span, parent), info.deadline)
        if call.recording:
            span.set_attribute("sidemesh.call_id", info.call_id)
            if info.caller:
                span.set_attribute("sidemesh.caller", info.caller)
            if target:
                span.set_attribute("sidemesh.target", target)
        return call


class CallSpan:
    """The span of one call being served, ended by leaving its ``with`` block.

    Leaving with ``CancelledError`` or ``GeneratorExit`` (grpc closing the
    stream) ends it ``CANCELLED``, or ``DEADLINE_EXCEEDED`` once the deadline
    has passed; with a ``SidemeshError``, its code; with anything else,
    ``UNKNOWN``. Exceptions are recorded on the span.
    """

    __slots__ = ("_context", "_deadline", "_failed", "messages", "recording", "span")

    def __init__(self, span: Span, context: otel_context.Context, deadline: float | None) -> None:
        self.span = span
        #: True when the span records; attribute work is skipped otherwise.
        self.recording = span.is_recording()
        #: Response messages sent so far; the servicer counts them.
        self.messages = 0
        self._context = context
        self._deadline = deadline
        self._failed = ""

    def current(self) -> _Current:
        """A ``with`` block in which the span is the current one.

        Tasks created inside it inherit the span; do not ``yield`` or
        ``await`` across a suspension point that may leave the task.
        """
        return _Current(self._context)

    def set_target(self, name: str) -> None:
        """Names the tool or agent the call runs (its plugin-local name)."""
        if self.recording:
            self.span.set_attribute("sidemesh.target", name)

    def tool_result(self, result: tool_pb2.ToolResult) -> None:
        """Notes a tool's result: ``is_error`` is the tool failing at its task, not the call."""
        if self.recording:
            self.span.set_attribute("sidemesh.tool.is_error", result.is_error)

    def agent_result(self, result: agent_pb2.AgentResult) -> None:
        """Notes an agent turn's result: a ``FAILED`` one makes the span an error."""
        if self.recording and result.status == _FAILED:
            self._failed = result.message or "the agent's turn failed"

    def __enter__(self) -> CallSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.recording:
            return
        span = self.span
        if exc is None:
            code, description = grpc.StatusCode.OK, self._failed
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            code = self._interruption()
            description = f"{code.name}: the call ended before its response did"
        else:
            span.record_exception(exc)
            if isinstance(exc, SidemeshError):
                code, description = exc.code, str(exc)
            else:
                code, description = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("sidemesh.messages.sent", self.messages)
        if description:
            span.set_status(Status(StatusCode.ERROR, description))
        span.end()

    def _interruption(self) -> grpc.StatusCode:
        deadline = self._deadline
        if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED


class _Current:
    """Attaches a context on entry and detaches it on exit, in the same task."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: otel_context.Context) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._context)

    def __exit__(self, *_: object) -> None:
        otel_context.detach(self._token)
