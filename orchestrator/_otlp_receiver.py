"""The OTLP ``TraceService`` the orchestrator serves: where sidecars and clients send spans.

Every export is bound to the source the orchestrator knows it came from: a
plugin's callback socket stands for that plugin (the data plane, which owns
the listeners, says which with trusted metadata), the mesh's own listeners for
clients. Everything a sender sends is taken as hostile: the request is decoded
here (not by gRPC), in a worker thread so that a large one never stalls the
event loop; a sender has at most a few exports in flight; and the answer
follows the OTLP specification:

- every span stored: an empty ``ExportTraceServiceResponse``;
- some refused: ``partial_success`` with ``rejected_spans`` and why;
- all refused: ``RESOURCE_EXHAUSTED`` (over quota; without ``RetryInfo``, so
  not to be retried), ``PERMISSION_DENIED`` (traces it is not part of) or
  ``INVALID_ARGUMENT`` (malformed spans, or a request that does not decode);
- too many exports at once (``MAX_IN_FLIGHT``), or too many bytes of them
  (``EXPORT_BYTES_PER_SECOND``): ``RESOURCE_EXHAUSTED`` with ``RetryInfo``,
  before anything is decoded.

Decoding and checking run on a small thread pool of their own (``INGEST_THREADS``),
shared by every receiver: senders of spans compete with each other, not with
the orchestrator's other work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from orchestrator._span_rows import MAX_STATUS, PLUGIN_PREFIX, Batch, cut
from orchestrator._trace_sources import (
    EXPORT_BYTES_PER_SECOND,
    Outcome,
    TraceSource,
    TraceSources,
)

log = logging.getLogger("sidemesh.telemetry")

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
#: Export requests one sender may have in flight; more are refused, to be retried.
MAX_IN_FLIGHT = 2
#: Threads that decode and check the spans of every receiver.
INGEST_THREADS = 2
#: A span larger than this (encoded) is forwarded to an OTLP endpoint as stored, not as sent.
MAX_FORWARD_SPAN_BYTES = 16 * 1024
_RETRY_DELAY = 0.5

Context = grpc.aio.ServicerContext[Any, Any]
#: Set by the data plane on what it passes on from a plugin's callback socket.
CALLER_KEY = "sidemesh-caller"
#: Reports refused spans: (source, replica, detail).
Report = Callable[[TraceSource, int, str], None]


class OtlpReceiver:
    """``TraceService/Export`` of the orchestrator's own services, for every listener.

    The data plane passes each export on with trusted metadata: on plugin
    NAME's callback socket ``sidemesh-caller: NAME`` (a client's own
    ``sidemesh-*`` metadata is stripped), so the spans are that plugin's;
    without it they are the clients'. ``sources`` None: tracing is off and
    spans are discarded. ``forward`` sends the stored spans on to the
    configured OTLP endpoint, if any.
    """

    def __init__(
        self,
        sources: TraceSources | None,
        *,
        executor: concurrent.futures.Executor | None = None,
        forward: Callable[[ExportTraceServiceRequest], None] | None = None,
        report: Report | None = None,
    ) -> None:
        self._sources = sources
        self._executor = executor
        self._forward = forward
        self._report = report

    def register(self, server: grpc.aio.Server) -> None:
        """Serves ``TraceService/Export`` on ``server``; the request arrives as bytes."""
        handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
            self.export,
            request_deserializer=None,
            response_serializer=ExportTraceServiceResponse.SerializeToString,
        )
        server.add_registered_method_handlers(SERVICE, {"Export": handler})

    async def export(self, payload: bytes, context: Context) -> ExportTraceServiceResponse:
        """Accepts a batch of spans (the request's encoded bytes)."""
        sources = self._sources
        if sources is None:
            return ExportTraceServiceResponse()
        caller = _caller(context)
        source = sources.client if caller is None else sources.plugins.get(caller)
        if source is None:  # a callback socket of a plugin without a source: none may send
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"plugin {caller!r} may not send spans to this mesh",
            )
        assert source is not None
        if source.in_flight >= MAX_IN_FLIGHT:
            source.throttled += 1
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many span exports in flight (at most {MAX_IN_FLIGHT}); retry shortly",
                retry=_RETRY_DELAY,
            )
        wait = source.throttle(len(payload))
        if wait:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"span exports above {EXPORT_BYTES_PER_SECOND >> 20} MiB/s; retry in {wait:.1f} s",
                retry=wait,
            )
        source.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            outcome, undecodable = await loop.run_in_executor(
                self._executor, self._admit, source, payload
            )
        finally:
            source.in_flight -= 1
        if outcome.refused:
            self._reporting(source, outcome.replica)
        if undecodable:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, undecodable)
        if not outcome.refused:
            return ExportTraceServiceResponse()
        detail = source.describe(outcome)
        if outcome.accepted:
            return ExportTraceServiceResponse(
                partial_success=trace_service_pb2.ExportTracePartialSuccess(
                    rejected_spans=outcome.refused, error_message=detail
                )
            )
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if outcome.over_quota
            else grpc.StatusCode.PERMISSION_DENIED
            if outcome.unknown_trace
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        await _abort(context, code, detail)
        raise AssertionError("unreachable")  # pragma: no cover

    def _reporting(self, source: TraceSource, replica: int, scheduled: bool = False) -> None:
        """Reports the refusals that are due; comes back once for those held back."""
        if scheduled:
            source.report_scheduled = False
        detail, later = source.report()
        if detail and self._report is not None:
            self._report(source, replica, detail)
        if later is not None and not source.report_scheduled:
            source.report_scheduled = True
            loop = asyncio.get_running_loop()
            loop.call_later(later + 0.01, self._reporting, source, replica, True)

    def _admit(self, source: TraceSource, payload: bytes) -> tuple[Outcome, str]:
        """Decodes, checks and stores one request (in a worker thread).

        Returns the outcome, and why the request does not decode ("" if it does).
        """
        assert self._sources is not None
        try:
            request = ExportTraceServiceRequest.FromString(payload)
        except Exception as exc:  # DecodeError, and whatever a hostile payload provokes
            outcome = Outcome(malformed=1)
            source.count(outcome)
            return outcome, f"not an OTLP ExportTraceServiceRequest: {type(exc).__name__}"
        outcome, batch, stored = source.admit(
            request, time.time_ns(), self._sources.knows, self._sources.reserved
        )
        if self._forward is not None and stored:
            self._forward(forwardable(request, batch, stored, source.source))
        return outcome, ""


def forwardable(
    request: ExportTraceServiceRequest, batch: Batch, stored: list[int], source: str
) -> ExportTraceServiceRequest:
    """The stored spans of ``request`` as an OTLP request, for the configured endpoint.

    Each resource is rebuilt with the stored ``service.name`` and
    ``sidemesh.source``; a span is sent as it came unless it is large or was
    cut, then as stored (without events and links).
    """
    out = ExportTraceServiceRequest()
    scopes: dict[int, Any] = {}
    for i in stored:
        index = batch.resources[i]
        row = batch.rows[i]
        scope = scopes.get(index)
        if scope is None:
            resource_spans = out.resource_spans.add()
            attributes = resource_spans.resource.attributes
            attributes.append(_kv("service.name", row[4]))
            attributes.append(_kv("sidemesh.source", source))
            if source.startswith(PLUGIN_PREFIX):
                attributes.append(_kv("sidemesh.plugin", source.removeprefix(PLUGIN_PREFIX)))
            scope = scopes[index] = resource_spans.scope_spans.add()
        span = batch.spans[i]
        if not batch.truncated[i] and span.ByteSize() <= MAX_FORWARD_SPAN_BYTES:
            scope.spans.append(span)
            continue
        copy = scope.spans.add(
            trace_id=span.trace_id, span_id=span.span_id, parent_span_id=span.parent_span_id,
            name=row[3], kind=row[5], start_time_unix_nano=row[6], end_time_unix_nano=row[7],
        )  # fmt: skip
        copy.status.code = span.status.code if row[8] else 0
        copy.status.message = cut(row[9], MAX_STATUS)
        for key, value in json.loads(row[10]).items():
            copy.attributes.append(_kv(key, value))
    return out


def _caller(context: Context) -> str | None:
    """The plugin whose callback socket the export came in on (the data plane says so)."""
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_KEY:
            return str(value)
    return None


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


async def _abort(
    context: Context, code: grpc.StatusCode, message: str, retry: float | None = None
) -> None:
    """Ends the call; ``retry``: seconds after which to retry (OTLP's ``RetryInfo``)."""
    trailers: tuple[tuple[str, bytes], ...] = ()
    if retry is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry * 1e9))
        info = error_details_pb2.RetryInfo(retry_delay=delay).SerializeToString()
        trailers = (("google.rpc.retryinfo-bin", info),)
    await context.abort(code, message, trailers)
