"""The sidecar's OpenTelemetry SDK: its spans, exported over OTLP to the mesh.

The sidecar runtime is an entry point, so it (not the plugin SDK, not the
plugin) configures the SDK. The orchestrator sets the standard variables:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (its callback socket, ``unix:/…/mesh.sock``),
``OTEL_EXPORTER_OTLP_INSECURE``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_SCHEDULE_DELAY`` and the sampler's
``OTEL_TRACES_SAMPLER[_ARG]``; the SDK and the official exporter read them.
Without an endpoint (or with ``OTEL_SDK_DISABLED=true``) no SDK is set up:
the API stays a no-op that still passes the caller's trace context on.

Exporting happens on the SDK's own thread, so an endpoint that is down never
blocks calls; at exit the last spans get a bounded time to leave.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("sidecars")

SDK_DISABLED_ENV = "OTEL_SDK_DISABLED"
#: Where spans go; the signal-specific variable wins, as in the exporter.
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: Seconds the last spans get to be exported when the sidecar exits.
SHUTDOWN_TIMEOUT = 2.0


@dataclass(frozen=True)
class Tracing:
    """The sidecar's tracer provider and its exporter, until :meth:`shutdown`."""

    provider: TracerProvider
    exporter: OTLPSpanExporter

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Exports the spans still queued, then stops; returns within about ``timeout``.

        An endpoint that is down makes the exporter retry for up to its own
        timeout (10 s by default); past ``timeout`` the exporter is shut down,
        which ends its retries, and the spans left are dropped.
        """
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            log.warning("could not export the last spans within %.1f s; dropping them", timeout)
            self.exporter.shutdown()
            worker.join(timeout)


def configure_tracing(plugin: str, *, root_sampler: Any = None) -> Tracing | None:
    """Sets the global propagator and, when spans have somewhere to go, the SDK.

    ``service.name`` is ``OTEL_SERVICE_NAME`` (or ``OTEL_RESOURCE_ATTRIBUTES``'),
    else ``plugin``. ``root_sampler`` decides about spans with no parent (their
    children follow their parent), unless ``OTEL_TRACES_SAMPLER`` says otherwise.
    Returns ``None`` when no SDK was set up; never raises.
    """
    propagate.set_global_textmap(
        CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    )
    if os.environ.get(SDK_DISABLED_ENV, "").strip().lower() == "true":
        return None
    if not any(os.environ.get(name) for name in ENDPOINT_ENVS):
        log.debug("no OTLP endpoint (%s): spans are not recorded", " or ".join(ENDPOINT_ENVS))
        return None
    try:
        # Imported here: they add ~0.1 s to the start of a sidecar that does not trace.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: plugin}))
        # The sampler comes from OTEL_TRACES_SAMPLER[_ARG]; exit is handled by shutdown().
        sampler = None
        if root_sampler is not None and not os.environ.get("OTEL_TRACES_SAMPLER"):
            from opentelemetry.sdk.trace.sampling import ParentBased

            sampler = ParentBased(root=root_sampler)
        provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
        exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    except Exception:
        log.warning("tracing is off: the OpenTelemetry SDK could not be set up", exc_info=True)
        return None
    trace.set_tracer_provider(provider)
    return Tracing(provider, exporter)
