"""The orchestrator's OpenTelemetry: its meters, and where every span goes.

The orchestrator is the mesh's embedded collector. Its own spans (made by the
data plane as trace store rows: a SERVER span per routed call, a CLIENT span
per attempt) go to the embedded trace store as source ``orchestrator``; the
spans sidecars send it over OTLP (on their callback sockets, since a sandboxed
sidecar has no network) and clients send to its listeners go through the
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

from opentelemetry import metrics
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from orchestrator._config import TelemetrySettings
from orchestrator._otlp_receiver import INGEST_THREADS, OtlpReceiver
from orchestrator._trace_sources import TraceSource, TraceSources
from orchestrator._trace_store import OwnRow, TraceStore
from sidemesh.v1 import mesh_pb2

log = logging.getLogger("sidemesh.telemetry")

TRACES_FILE = "traces.db"
_STOP = object()
#: What a configured OTLP endpoint gets to take the last metrics, and the last spans, at shutdown.
FLUSH_SECONDS = 2.0


def rows_to_otlp(rows: Sequence[tuple[Any, ...]], service: str) -> ExportTraceServiceRequest:
    """The data plane's span rows (see ``span_rows``) as one OTLP export request."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = service
    scope = resource_spans.scope_spans.add()
    scope.scope.name = "sidemesh.orchestrator"
    for trace_id, span_id, parent, name, _service, kind, start, end, error, message, attrs in rows:
        span = scope.spans.add(
            trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id),
            parent_span_id=bytes.fromhex(parent) if parent else b"", name=name, kind=kind,
            start_time_unix_nano=start, end_time_unix_nano=end,
        )  # fmt: skip
        if error:
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = message
        for key, value in json.loads(attrs).items():
            span.attributes.add(key=key).value.string_value = str(value)
    return request


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

    def close(self, timeout: float) -> None:
        """Sends what is queued (within ``timeout``), then stops (abandoning a retry)."""
        self._requests.put(_STOP)
        self._thread.join(timeout)
        self.shutdown()


class Telemetry:
    """Meter, trace store, span receiver and OTLP export of one orchestrator."""

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
        self._receiver: OtlpReceiver | None = None
        self._meter_provider: MeterProvider | None = None
        #: ``service.name`` of the orchestrator's own spans.
        self.service = os.environ.get("OTEL_SERVICE_NAME", "sidemesh-orchestrator")
        resource = Resource.create({"service.name": self.service})
        if self.enabled:
            self.store = TraceStore(
                state_dir / TRACES_FILE, settings.max_traces, settings.max_store_mb << 20
            )
            self.sources = TraceSources(
                self.store, settings.client_quota_mb << 20, orchestrator_service=self.service
            )
            self._ingest = concurrent.futures.ThreadPoolExecutor(
                INGEST_THREADS, thread_name_prefix="otlp-ingest"
            )
            if self.endpoint:
                self._forwarder = _Forwarder(self.endpoint)
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

    def add_rows(self, rows: list[OwnRow]) -> None:
        """The orchestrator's own spans (the data plane's rows): to the store and the endpoint."""
        if self.store is not None:
            self.store.add_own(rows)
        if self._forwarder is not None:
            self._forwarder.submit(rows_to_otlp(rows, self.service))

    def add_plugin(self, plugin: str, *, quota_mb: int, replicas: int = 1) -> None:
        """Registers a plugin with a callback socket: its spans may take ``quota_mb`` MiB."""
        if self.sources is not None:
            self.sources.add_plugin(plugin, quota_mb << 20, replicas)

    def receiver(self) -> OtlpReceiver:
        """The OTLP receiver of the orchestrator's own services (one, whatever the listener).

        A call the data plane passes on from plugin NAME's callback socket
        carries ``sidemesh-caller: NAME`` (a client cannot send it): its spans
        are that plugin's; any other call's are clients'.
        """
        if self._receiver is None:
            forwarder = self._forwarder
            self._receiver = OtlpReceiver(
                self.sources,
                executor=self._ingest,
                forward=forwarder.submit if forwarder is not None else None,
                report=self._refused,
            )
        return self._receiver

    def routed(self, plugin: str, trace_id: int, caller: str = "") -> None:
        """Notes a call of trace ``trace_id`` routed to ``plugin`` (from plugin ``caller``).

        Every forwarding path calls it for every call it routes (the data
        plane's :meth:`Decider.decide <orchestrator._routing.Decider.decide>`),
        before the call reaches the sidecar: it is how the trace store knows
        which traces a plugin may add spans to. Thread-safe, about a microsecond.
        """
        if self.sources is not None and trace_id:
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
        """Exports what is buffered and stops every exporter and the store.

        An OTLP endpoint that is down or slow gets at most ``FLUSH_SECONDS`` for the
        metrics and as much for the spans: shutting down never waits on its retries.
        """
        if self._meter_provider is not None:
            self._meter_provider.shutdown(timeout_millis=FLUSH_SECONDS * 1000)
        if self._ingest is not None:
            self._ingest.shutdown(wait=True, cancel_futures=True)
        if self._forwarder is not None:
            self._forwarder.close(FLUSH_SECONDS)
        if self.store is not None:
            self.store.close()
