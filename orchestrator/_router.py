"""The router: serves AgentService, ToolService and McpService by forwarding to sidecars.

This is the mesh's hot path. A request is parsed once, to find its target and
check it; the response stream is forwarded as the raw bytes the sidecar sent,
never decoded or re-encoded (see :meth:`Router._serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from clients import PermissionDeniedError, ResourceExhaustedError, SidemeshError
from orchestrator._attempts import AttemptFailed, attempt, give_up
from orchestrator._catalog import Catalog, Entry
from orchestrator._events import EventBus
from orchestrator._plugin import PluginRuntime
from orchestrator._replica import Replica
from orchestrator._resilience import TRANSPORT, backoff
from orchestrator._routes import MCP_SERVICE, ROUTES, TOOL_SERVICE, Route
from orchestrator._telemetry import Telemetry
from sidemesh.v1 import mesh_pb2, tool_pb2

log = logging.getLogger("sidemesh.router")

_TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})
_HOP_HEADERS = frozenset(
    {"user-agent", "te", "content-type", "sidemesh-caller", "sidemesh-call-id"}
)
_OK = grpc.StatusCode.OK
Context = grpc.aio.ServicerContext[Any, Any]


class Admission:
    """Counts calls in flight across the whole orchestrator against the configured limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        #: Set when the mesh shuts down: calls cut off then say so.
        self.closing = False

    def enter(self) -> None:
        """Admits one call, or raises ``RESOURCE_EXHAUSTED``."""
        if self.in_flight >= self.limit:
            raise ResourceExhaustedError(
                f"the mesh is at its limit of {self.limit} concurrent calls; retry shortly "
                "(operators: raise limits.max_concurrent_calls)",
                reason="CONCURRENCY_LIMIT",
                retry_delay=0.1,
            )
        self.in_flight += 1

    def leave(self) -> None:
        """Releases one call."""
        self.in_flight -= 1


# -- the router ----------------------------------------------------------------


class Router:
    """Forwards calls to plugins; one per listener (``caller``: the plugin on a callback socket)."""

    def __init__(
        self,
        catalog: Catalog,
        plugins: Mapping[str, PluginRuntime],
        events: EventBus,
        admission: Admission,
        telemetry: Telemetry,
        *,
        caller: PluginRuntime | None = None,
    ) -> None:
        self.catalog = catalog
        self._plugins = plugins
        self._events = events
        self._admission = admission
        self._telemetry = telemetry
        self._tracing = telemetry.enabled
        self._caller = caller
        self._caller_name = caller.name if caller else ""
        self._call_ids = _CallIds()
        # Only when metrics are exported: recording costs an attribute dict per call.
        self._durations = (
            telemetry.meter.create_histogram(
                "rpc.server.call.duration", unit="s", description="Duration of routed calls"
            )
            if telemetry.metrics_exported
            else None
        )

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the routed services to ``server``."""
        raw: Any = None  # no (de)serializer: the handler sees and returns bytes
        handlers: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
        for route in ROUTES:
            factory = {
                "unary_unary": grpc.unary_unary_rpc_method_handler,
                "unary_stream": grpc.unary_stream_rpc_method_handler,
                "stream_stream": grpc.stream_stream_rpc_method_handler,
            }[route.kind]
            handlers.setdefault(route.service, {})[route.method] = factory(
                self._handler(route), raw, raw
            )
        handlers[TOOL_SERVICE]["ListTools"] = grpc.unary_unary_rpc_method_handler(
            self._list_tools,
            tool_pb2.ListToolsRequest.FromString,
            tool_pb2.ListToolsResponse.SerializeToString,
        )
        for service, methods in handlers.items():
            server.add_registered_method_handlers(service, methods)

    def _handler(self, route: Route) -> Callable[..., Any]:
        if route.kind == "unary_unary":

            async def unary(payload: bytes, context: Context) -> bytes:
                responses = [r async for r in self._serve(route, payload, context)]
                return responses[-1] if responses else b""

            return unary

        async def stream(payload: Any, context: Context) -> AsyncIterator[bytes]:
            async for response in self._serve(route, payload, context):
                yield response

        return stream

    async def _list_tools(
        self, request: tool_pb2.ListToolsRequest, context: Context
    ) -> tool_pb2.ListToolsResponse:
        tools = self.catalog.tools(plugin=request.plugin)
        if self._caller is not None:
            tools = [t for t in tools if self._permitted("tool", t.qualified_name)]
        return tool_pb2.ListToolsResponse(tools=tools)

    # -- the hot path ----------------------------------------------------------

    async def _serve(self, route: Route, payload: Any, context: Context) -> AsyncIterator[bytes]:
        """One routed call: resolve, admit, forward raw bytes both ways, account for it.

        The sidecar's responses are yielded as the bytes they arrived as: the
        multicallables from :meth:`Replica.method` have no deserializer, and the
        handler no serializer. A failed attempt is retried on another replica
        when that is safe (:meth:`_retry`).
        """
        started = time.monotonic()
        metadata, carrier = self._split_metadata(context)
        span = self._server_span(route, carrier) if self._tracing else None
        entry: Entry[Any] | None = None
        code, details, count, attempts = _OK, "", 0, 0
        try:
            entry, payload = await route.resolve(self, payload)
            plugin = self._plugins[entry.plugin]
            replica = plugin.pick()
            self._admission.enter()
        except SidemeshError as err:
            code, details = err.code, err.message
            self._end_span(span, code, details, entry, 0)
            await err.abort(context)
        resilience = plugin.resilience
        resilience.budget.deposit()
        per_try = resilience.retries.per_try_timeout if route.kind != "stream_stream" else None
        call_id = self._call_ids.next()
        metadata.append(("sidemesh-call-id", call_id))
        if span is None:
            metadata += carrier.items()  # not tracing: pass the caller's context on as is
        else:  # the plugin (and a calling plugin) may add spans to this trace
            self._telemetry.routed(
                entry.plugin, span.get_span_context().trace_id, self._caller_name
            )
        self._call_started(entry, route.path, call_id, replica)
        tried: list[Replica] = []
        client_span: trace.Span | None = None
        last = b""
        try:
            while True:
                attempts += 1
                tried.append(replica)
                client_span, sent = None, metadata
                if span is not None:
                    client_span, sent = self._client_span(
                        route, span, entry, replica, call_id, metadata, attempts
                    )
                messages = attempt(
                    replica, route.path, route.kind, payload, metadata=sent,
                    timeout=context.time_remaining(), per_try=per_try,
                )  # fmt: skip
                try:
                    async with contextlib.aclosing(messages):  # ends the upstream call at once
                        async for message in messages:
                            count += 1
                            last = message
                            yield message
                except AttemptFailed as failure:
                    if failure.kind == TRANSPORT and _complete(route, last):
                        # The sidecar went away after its result: the caller has it all.
                        log.info("%s: call %s complete; the sidecar went away after its result",
                                 replica.tag, call_id)  # fmt: skip
                        resilience.failed(replica, failure.kind, plugin.ready)
                        return
                    if client_span is not None:
                        _end(client_span, failure.code, failure.details, count)
                        client_span = None
                    if failure.kind is not None:
                        resilience.failed(replica, failure.kind, plugin.ready)
                    other = self._retry(route, entry, plugin, failure, attempts, count, tried)
                    delay = backoff(resilience.retries, attempts) if other else 0.0
                    if other is not None and _time_left(context, delay):
                        if span is not None:
                            why = {
                                "sidemesh.replica": other.index,
                                "sidemesh.failure": failure.kind,
                            }
                            span.add_event("retry", why)
                        await asyncio.sleep(delay)
                        replica = other
                        continue
                    if failure.kind is not None:
                        log.info(
                            "%s: call %s failed (%s) after %d attempt(s), not retried: %s",
                            replica.tag, call_id, failure.kind, attempts,
                            _why_not(other, count, route, entry, plugin),
                        )  # fmt: skip
                    code, details, trailers = await give_up(
                        failure, plugin, replica, self._admission.closing
                    )
                    await context.abort(code, details, trailers)
                resilience.succeeded(replica)
                return
        except (asyncio.CancelledError, GeneratorExit):
            code, details = _interruption(context)
            raise
        finally:
            self._admission.leave()
            if client_span is not None:
                _end(client_span, code, details, count)
            self._end_span(span, code, details, entry, count)
            if self._durations is not None:
                self._durations.record(
                    time.monotonic() - started,
                    {"rpc.method": route.path, "sidemesh.target": entry.qualified,
                     "rpc.grpc.status_code": code.value[0]},
                )  # fmt: skip
            self._call_ended(entry, route.path, call_id, code, details, started, count, attempts)

    def _retry(
        self,
        route: Route,
        entry: Entry[Any],
        plugin: PluginRuntime,
        failure: AttemptFailed,
        attempts: int,
        count: int,
        tried: list[Replica],
    ) -> Replica | None:
        """The replica to try next after ``failure``, or None: give up.

        Only before any response reached the caller, never for a chat (its
        requests are a stream), only when it is safe (:meth:`Resilience.may_retry`),
        and on another replica.
        """
        if failure.kind is None or count or route.kind == "stream_stream":
            return None
        if self._admission.closing:
            return None
        other = plugin.pick_other(tried)
        if other is None:
            return None
        if not plugin.resilience.may_retry(failure.kind, _idempotent(route, entry), attempts):
            return None
        return other

    def _split_metadata(self, context: Context) -> tuple[list[tuple[str, Any]], dict[str, str]]:
        """The caller's metadata to pass on, and its W3C trace context headers apart."""
        forwarded: list[tuple[str, Any]] = []
        carrier: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if key in _TRACE_HEADERS:
                carrier[key] = str(value)
            elif key not in _HOP_HEADERS and not key.startswith(("grpc-", ":")):
                forwarded.append((key, value))
        if self._caller_name:
            forwarded.append(("sidemesh-caller", self._caller_name))
        return forwarded, carrier

    # -- tracing ---------------------------------------------------------------

    def _server_span(self, route: Route, carrier: dict[str, str]) -> trace.Span:
        parent = propagate.extract(carrier) if carrier else None
        span = self._telemetry.tracer.start_span(
            f"{route.service}/{route.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": route.service,
                        "rpc.method": route.method},
        )  # fmt: skip
        if self._caller_name:
            span.set_attribute("sidemesh.caller", self._caller_name)
        # Each RPC runs in its own task: the span stays current for this call's logs.
        otel_context.attach(trace.set_span_in_context(span, parent))
        return span

    def _client_span(
        self,
        route: Route,
        server: trace.Span,
        entry: Entry[Any],
        replica: Replica,
        call_id: str,
        metadata: list[tuple[str, Any]],
        attempt: int,
    ) -> tuple[trace.Span, list[tuple[str, Any]]]:
        """The CLIENT span of one attempt, and the metadata that carries it to the sidecar."""
        plugin = self._plugins[entry.plugin]
        if attempt == 1:
            server.set_attribute("sidemesh.target", entry.qualified)
            server.set_attribute("sidemesh.call_id", call_id)
        server.add_event(
            "route",
            {"sidemesh.plugin": entry.plugin, "sidemesh.replica": replica.index,
             "sidemesh.routing": plugin.routing, "sidemesh.ready_replicas": len(plugin.ready)},
        )  # fmt: skip
        span = self._telemetry.tracer.start_span(
            f"{route.service}/{route.method}",
            context=trace.set_span_in_context(server),
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc", "rpc.service": route.service, "rpc.method": route.method,
                "server.address": replica.address, "network.transport": "unix",
                "sidemesh.plugin": entry.plugin, "sidemesh.replica": replica.index,
                "sidemesh.plugin.version": plugin.version, "sidemesh.call_id": call_id,
                "sidemesh.attempt": attempt,
            },
        )  # fmt: skip
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, metadata + list(carrier.items())

    def _end_span(
        self,
        span: trace.Span | None,
        code: grpc.StatusCode,
        details: str,
        entry: Entry[Any] | None,
        count: int,
    ) -> None:
        if span is None:
            return
        if entry is not None:
            span.set_attribute("sidemesh.target", entry.qualified)
        _end(span, code, details, count)

    # -- permissions -----------------------------------------------------------

    def _permitted(self, kind: str, qualified: str) -> bool:
        assert self._caller is not None
        return self._caller.may_call(kind, qualified)

    def authorize(self, kind: str, entry: Entry[Any], method: str) -> None:
        """Raises ``PERMISSION_DENIED`` (and records it) when the caller may not call ``entry``."""
        if self._caller is None or self._permitted(kind, entry.qualified):
            return
        field = "tools" if kind == "tool" else "agents"
        asked = self._caller.asked(kind)
        if any(fnmatch.fnmatchcase(entry.qualified, p) for p in asked):
            where = f"plugins.{self._caller_name}.permissions.{field} in the Sidemesh config"
        else:
            where = f"permissions.{field} in {self._caller_name}'s plugin.yaml"
        reason = (
            f"plugin {self._caller_name!r} may not call {kind} {entry.qualified!r}: add it "
            f"(or a pattern such as '{entry.plugin}/*') to {where}"
        )
        self._events.emit(
            self._caller_name,
            "permission_denied",
            mesh_pb2.PermissionDenied(
                caller=self._caller_name, target=entry.qualified, method=method, reason=reason
            ),
            also=(entry.plugin,),
        )
        log.warning("permission denied: %s", reason)
        raise PermissionDeniedError(
            reason, reason="PERMISSION_DENIED", metadata={"caller": self._caller_name}
        )

    # -- events ----------------------------------------------------------------

    def _call_started(self, entry: Entry[Any], method: str, call_id: str, replica: Replica) -> None:
        trace_id = trace.get_current_span().get_span_context().trace_id
        caller, target, index = self._caller_name, entry.qualified, replica.index

        def build() -> mesh_pb2.CallStarted:
            return mesh_pb2.CallStarted(
                call_id=call_id, method=method, target=target, caller=caller, replica=index,
                trace_id=f"{trace_id:032x}" if trace_id else "",
            )  # fmt: skip

        self._events.emit(entry.plugin, "call_started", build, also=(caller,) if caller else ())

    def _call_ended(
        self,
        entry: Entry[Any],
        method: str,
        call_id: str,
        code: grpc.StatusCode,
        details: str,
        started: float,
        count: int,
        attempts: int,
    ) -> None:
        trace_id = trace.get_current_span().get_span_context().trace_id
        caller, target = self._caller_name, entry.qualified
        nanos = int((time.monotonic() - started) * 1e9)

        def build() -> mesh_pb2.CallEnded:
            ended = mesh_pb2.CallEnded(
                call_id=call_id, method=method, target=target, caller=caller,
                code=code.value[0], message=details, responses=count, attempts=attempts,
                trace_id=f"{trace_id:032x}" if trace_id else "",
            )  # fmt: skip
            ended.duration.FromNanoseconds(nanos)
            return ended

        self._events.emit(
            entry.plugin,
            "call_finished" if code == _OK else "call_failed",
            build,
            also=(caller,) if caller else (),
        )


def _idempotent(route: Route, entry: Entry[Any]) -> bool:
    """Whether calling ``entry`` twice is safe: a read-only or idempotent tool, an MCP read."""
    if route.service == MCP_SERVICE and route.method not in ("CallTool", "Watch"):
        return True
    descriptor = entry.descriptor
    if not isinstance(descriptor, tool_pb2.ToolDescriptor):
        return False
    hints = descriptor.annotations
    return hints.read_only or hints.idempotent


def _why_not(
    other: Replica | None, count: int, route: Route, entry: Entry[Any], plugin: PluginRuntime
) -> str:
    """Why a failed call was not retried, for the log."""
    if count:
        return "responses had reached the caller"
    if route.kind == "stream_stream":
        return "a chat is never retried"
    if other is not None:
        return "its deadline leaves no time"
    if not _idempotent(route, entry):
        return "the call is not idempotent"
    if not plugin.pick_other(()):
        return "no other replica is ready"
    return "no other replica, or the attempts or the retry budget are spent"


def _complete(route: Route, last: bytes) -> bool:
    """Whether the last message forwarded ends the stream by contract (a result)."""
    return route.final_tag is not None and last[:1] == bytes((route.final_tag,))


def _time_left(context: Context, delay: float) -> bool:
    """Whether the caller's deadline leaves room for a retry after ``delay`` seconds."""
    remaining = context.time_remaining()
    return remaining is None or remaining > delay + 0.01


def _interruption(context: Context) -> tuple[grpc.StatusCode, str]:
    """Why this handler is being cancelled: the caller's deadline, or the caller."""
    # grpc.aio cancels the handler both when the caller cancels and at its deadline.
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed"
    return grpc.StatusCode.CANCELLED, "cancelled by the caller"


def _end(span: trace.Span, code: grpc.StatusCode, details: str, count: int) -> None:
    """Ends a call's span with its gRPC status and message count."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_attribute("sidemesh.messages.sent", count)
    if code != _OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
    span.end()


class _CallIds:
    """Short unique call ids: a per-process random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}-{self._n}"
