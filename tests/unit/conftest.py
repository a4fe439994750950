"""Fixtures shared by the unit tests.

OpenTelemetry's global tracer provider can be set once per process, so one
session-wide provider records every span of the unit tests (which also runs
the whole suite with tracing on) into an in-memory exporter; ``spans`` hands
it to a test, emptied.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture(scope="session", autouse=True)
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """The exporter behind the process's global tracer provider."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        raise RuntimeError("another tracer provider was set before the unit tests' own")
    yield exporter
    provider.shutdown()


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The in-memory exporter, holding only the spans this test makes."""
    span_exporter.clear()
    return span_exporter
