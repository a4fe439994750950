"""The orchestrator's OpenTelemetry: its tracer and meters, and where every span goes.

The orchestrator is the mesh's embedded collector. Its own spans go to the
embedded trace store as rows (source ``orchestrator``); the spans sidecars
send it over OTLP (on their callback sockets, since a sandboxed sidecar has no
network) and clients send to its listeners go through an
:class:`~orchestrator._otlp_receiver.OtlpReceiver`, which stamps them with
their source and keeps them within their bounds. When an OTLP endpoint is
configured, what is stored also goes there with the official OTLP exporter.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from orchestrator._config import TelemetrySettings
from orchestrator._otlp_receiver import INGEST_THREADS, OtlpReceiver
from orchestrator._trace_sources import TraceSource, TraceSources
from orchestrator._trace_store import OwnRow, TraceStore
from sidemesh.v1 import mesh_pb2

log = logging.getLogger("sidemesh.telemetry")

TRACES_FILE = "traces.db"
_STOP = object()


class _SinkExporter(SpanExporter):
    """The orchestrator's own finished spans: rows for the store, OTLP for an endpoint.

    Rows are made straight from the SDK's spans; encoding them to OTLP protobuf
    (and the store decoding them again) would cost the router's thread its GIL.
    """

    def __init__(
        self,
        store: TraceStore | None,
        forwarder: _Forwarder | None,
        service: str,
    ) -> None:
        self._store = store
        self._forwarder = forwarder
        self._service = service

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._store is not None:
            self._store.add_own([_row(span, self._service) for span in spans])
        if self._forwarder is not None:
            self._forwarder.submit(encode_spans(spans))
        return SpanExportResult.SUCCESS


def _row(span: ReadableSpan, service: str) -> OwnRow:
    """A trace store row (see :data:`orchestrator._trace_store.OwnRow`) for one of its spans."""
    context = span.context
    assert context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else ""
    attributes = {
        key: value if isinstance(value, str) else json.dumps(
            list(value) if isinstance(value, tuple) else value
        )
        for key, value in (span.attributes or {}).items()
    }  # fmt: skip
    error = span.status.status_code is StatusCode.ERROR
    return (
        f"{context.trace_id:032x}", f"{context.span_id:016x}", parent, span.name, service,
        span.kind.value + 1,  # the API counts from INTERNAL = 0, OTLP from INTERNAL = 1
        span.start_time or 0, span.end_time or 0, int(error), span.status.description or "",
        json.dumps(attributes),
    )  # fmt: skip


class _Forwarder(OTLPSpanExporter):
    """Sends OTLP requests that are already encoded to the configured endpoint.

    The official exporter's settings (``OTEL_EXPORTER_OTLP_*``: TLS, headers,
    compression, timeout) and its retries apply; requests are queued and sent
    from one thread, and dropped (with a warning) when the endpoint falls behind.
    """

    def __init__(self, endpoint: str | None) -> None:
        super().__init__(endpoint=endpoint)
        self._requests: queue.Queue[Any] = queue.Queue(maxsize=2048)
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="otlp-forward", daemon=True)
        self._thread.start()

    def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
        return data  # type: ignore[no-any-return]

    def _count_data(self, data: Any) -> int:
        return sum(len(ss.spans) for rs in data.resource_spans for ss in rs.scope_spans)

    def submit(self, request: ExportTraceServiceRequest) -> None:
        """Queues ``request`` for the endpoint; never blocks."""
        try:
            self._requests.put_nowait(request)
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 100, 10_000):
                log.warning("OTLP endpoint is behind: dropped %d span batches", self._dropped)

    def _run(self) -> None:
        while (request := self._requests.get()) is not _STOP:
            self._export(request)

    def close(self, timeout: float = 5.0) -> None:
        """Sends what is queued (within ``timeout``), then stops."""
        self._requests.put(_STOP)
        self._thread.join(timeout)
        self.shutdown()


class Telemetry:
    """Tracer, meter, trace store and OTLP export of one orchestrator."""

    def __init__(self, settings: TelemetrySettings, state_dir: Path) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.endpoint = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        self.store: TraceStore | None = None
        #: Who sends spans, and what each may store; None when tracing is off.
        self.sources: TraceSources | None = None
        #: Called with (plugin, replica, detail) when a plugin's spans are refused (at a
        #: bounded rate): the orchestrator makes it a ``sandbox_violation`` event.
        self.on_violation: Callable[[str, int, str], None] | None = None
        self._forwarder: _Forwarder | None = None
        self._ingest: concurrent.futures.ThreadPoolExecutor | None = None
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        service = os.environ.get("OTEL_SERVICE_NAME", "sidemesh-orchestrator")
        self.service = service
        resource = Resource.create({"service.name": service})
        if self.enabled:
            self.store = TraceStore(
                state_dir / TRACES_FILE, settings.max_traces, settings.max_store_mb << 20
            )
            self.sources = TraceSources(
                self.store, settings.client_quota_mb << 20, orchestrator_service=service
            )
            self._ingest = concurrent.futures.ThreadPoolExecutor(
                INGEST_THREADS, thread_name_prefix="otlp-ingest"
            )
            if self.endpoint:
                self._forwarder = _Forwarder(self.endpoint)
            self._tracer_provider = TracerProvider(resource=resource)
            self._tracer_provider.add_span_processor(
                BatchSpanProcessor(
                    _SinkExporter(self.store, self._forwarder, service),
                    schedule_delay_millis=settings.export_delay_ms,
                )
            )
            self.tracer: trace.Tracer = self._tracer_provider.get_tracer("sidemesh.orchestrator")
        else:
            self.tracer = trace.NoOpTracer()
        if self.enabled and self.endpoint:
            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=self.endpoint),
                export_interval_millis=settings.metrics_interval * 1000,
            )
            self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
            self.meter: metrics.Meter = self._meter_provider.get_meter("sidemesh.orchestrator")
        else:
            self.meter = metrics.NoOpMeter("sidemesh.orchestrator")

    @property
    def metrics_exported(self) -> bool:
        """Whether metrics go anywhere (an OTLP endpoint is configured)."""
        return self._meter_provider is not None

    def receiver(self, plugin: str = "", *, quota_mb: int = 0, replicas: int = 1) -> OtlpReceiver:
        """The OTLP receiver for a listener: plugin ``plugin``'s callback socket, or ("")
        the mesh's own listeners (clients). A plugin's spans may take ``quota_mb`` MiB."""
        sources = self.sources
        source: TraceSource | None = None
        if sources is not None:
            source = (
                sources.add_plugin(plugin, quota_mb << 20, replicas) if plugin else sources.client
            )
        forwarder = self._forwarder
        return OtlpReceiver(
            source,
            sources,
            executor=self._ingest,
            forward=forwarder.submit if forwarder is not None else None,
            report=self._refused,
        )

    def routed(self, plugin: str, trace_id: int, caller: str = "") -> None:
        """Notes a call of trace ``trace_id`` routed to ``plugin`` (from plugin ``caller``).

        Any forwarding path calls it for every call it routes (the router, and
        the data plane's ``decide`` with ``int(call.trace_id, 16)``), before the
        call reaches the sidecar: it is how the trace store knows which traces
        a plugin may add spans to. Thread-safe, under a microsecond.
        """
        if self.sources is not None:
            self.sources.routed(plugin, trace_id, caller)

    def trace_usage(self, plugin: str) -> mesh_pb2.TraceUsage | None:
        """What ``plugin``'s spans take in the store and what was refused; None if unknown."""
        source = self.sources.plugins.get(plugin) if self.sources is not None else None
        return source.usage() if source is not None else None

    def _refused(self, source: TraceSource, replica: int, detail: str) -> None:
        log.warning("%s", detail)
        if source.plugin and self.on_violation is not None:
            self.on_violation(source.plugin, replica, detail)

    def sidecar_environment(self) -> dict[str, str]:
        """``OTEL_*`` settings every sidecar gets (its endpoint is its callback socket)."""
        if not self.enabled:
            return {"OTEL_SDK_DISABLED": "true"}
        env = {
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": str(self.settings.export_delay_ms),
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_PROPAGATORS"):
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    def observe(
        self, name: str, description: str, unit: str, callback: Callable[[], Iterable[Any]]
    ) -> None:
        """Registers an observable gauge read at each metrics export."""
        self.meter.create_observable_gauge(
            name, callbacks=[lambda _options: list(callback())], unit=unit, description=description
        )

    def shutdown(self) -> None:
        """Exports what is buffered and stops every exporter and the store."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        if self._ingest is not None:
            self._ingest.shutdown(wait=True, cancel_futures=True)
        if self._forwarder is not None:
            self._forwarder.close()
        if self.store is not None:
            self.store.close()
