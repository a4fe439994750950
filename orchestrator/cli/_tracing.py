"""Tracing for ``sidemesh invoke`` and ``call``: the command is the root of its trace.

The CLI is an entry point, so it configures the OpenTelemetry SDK: its spans go
to ``$OTEL_EXPORTER_OTLP_ENDPOINT`` when set, else to the mesh it calls (the
orchestrator keeps them with the spans of every other process of the call).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from clients import AsyncMeshClient


@contextlib.contextmanager
def traced_command(
    name: str, mesh_address: str, client: AsyncMeshClient | None = None
) -> Iterator[trace.Span]:
    """Runs the body inside a root span ``name``, exported when the body ends.

    ``client`` is the command's: its credentials export the spans to the mesh.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        yield trace.INVALID_SPAN
        return
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter_options: dict[str, Any] = {"insecure": True}
    if not endpoint:
        endpoint = mesh_address
        credentials = client.credentials if client is not None else None
        if credentials is not None and credentials.tls is not None:
            exporter_options = {"credentials": credentials.channel_credentials()}
        elif credentials is not None and credentials.metadata():
            exporter_options["headers"] = dict(credentials.metadata())
    # A mesh without a collector (or an unreachable endpoint) must not fill the terminal.
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "sidemesh-cli")}
        )
    )
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=2, **exporter_options))
    )
    trace.set_tracer_provider(provider)
    try:
        with provider.get_tracer("sidemesh.cli").start_as_current_span(name) as span:
            yield span
    finally:
        provider.shutdown()
