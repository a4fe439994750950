"""One trace across client, orchestrator and sidecars; OTLP export; span status per outcome."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from meshproc import DEMO_PLUGINS, TEST_PLUGINS, Mesh, wait_until
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clients import AsyncMeshClient, DeadlineExceededError, NotFoundError
from sidemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2, mesh_pb2_grpc

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
SERVER, CLIENT = mesh_pb2.SPAN_KIND_SERVER, mesh_pb2.SPAN_KIND_CLIENT


class _Receiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """A real OTLP/gRPC receiver (the collector services from opentelemetry-proto)."""

    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.traces.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def spans(self) -> list[tuple[str, str, str]]:
        """(service, trace id, span id) of every span received."""
        out = []
        for request in self.traces:
            for rs in request.resource_spans:
                service = next(
                    a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
                )
                for ss in rs.scope_spans:
                    out += [(service, s.trace_id.hex(), s.span_id.hex()) for s in ss.spans]
        return out

    def metric_names(self) -> set[str]:
        return {
            m.name
            for r in self.metrics
            for rm in r.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }


@pytest.fixture
def receiver() -> Iterator[tuple[_Receiver, int]]:
    from concurrent import futures

    servicer = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


@pytest.fixture
def client_tracer() -> tuple[trace.Tracer, InMemorySpanExporter]:
    """A tracer for the test's own span (the client process's root)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test-client"), exporter


def _mesh(make_mesh: MakeMesh, **config: Any) -> Mesh:
    dirs = [*DEMO_PLUGINS, str(TEST_PLUGINS / "workers")]
    return make_mesh(plugin_dirs=dirs, **config).start(ready=["tools-demo", "assistant", "workers"])


def _trace(mesh: Mesh, trace_id: str, min_spans: int) -> list[mesh_pb2.TraceSpan]:
    """The trace from the mesh's store, once it holds at least ``min_spans`` spans."""

    def get() -> list[mesh_pb2.TraceSpan] | None:
        with grpc.insecure_channel(mesh.address) as channel:
            stub = mesh_pb2_grpc.MeshServiceStub(channel)
            try:
                spans = list(stub.GetTrace(mesh_pb2.GetTraceRequest(trace_id=trace_id)).spans)
            except grpc.RpcError:
                return None
        return spans if len(spans) >= min_spans else None

    return wait_until(get, 10, f"trace {trace_id} to hold {min_spans} spans", interval=0.2)


def _by_id(spans: list[mesh_pb2.TraceSpan]) -> dict[str, mesh_pb2.TraceSpan]:
    return {s.span_id: s for s in spans}


def _child(spans: list[mesh_pb2.TraceSpan], parent: str, **want: Any) -> mesh_pb2.TraceSpan:
    matches = [
        s
        for s in spans
        if s.parent_span_id == parent and all(getattr(s, k) == v for k, v in want.items())
    ]
    assert matches, f"no child of {parent} with {want} in:\n" + "\n".join(
        f"{s.service} {s.name} kind={s.kind} {s.span_id} <- {s.parent_span_id}" for s in spans
    )
    return matches[0]


async def test_an_agent_call_with_a_callback_is_one_trace_across_four_processes(
    make_mesh: MakeMesh, client_tracer: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    mesh = _mesh(make_mesh)
    tracer, exported = client_tracer
    with tracer.start_as_current_span("test client", kind=trace.SpanKind.CLIENT) as root:
        async with AsyncMeshClient(mesh.address) as client:
            reply = await client.invoke("assistant", "What is 20 + 22?").collect()
    assert "42" in reply.text
    trace_id = f"{root.get_span_context().trace_id:032x}"
    root_id = f"{root.get_span_context().span_id:016x}"
    assert [s.name for s in exported.get_finished_spans()] == ["test client"]

    # Seven in the store: the orchestrator server+client twice, the assistant server+client,
    # tools-demo; the assistant's SERVER span ends last, after its callback's spans are in.
    spans = _trace(mesh, trace_id, min_spans=7)
    assert {s.trace_id for s in spans} == {trace_id}
    # client -> orchestrator server -> orchestrator client -> assistant server
    o_server = _child(spans, root_id, kind=SERVER, service="sidemesh-orchestrator")
    assert o_server.name == "sidemesh.v1.AgentService/Invoke"
    assert o_server.attributes["sidemesh.target"] == "assistant/assistant"
    assert o_server.attributes["rpc.grpc.status_code"] == "0"
    o_client = _child(spans, o_server.span_id, kind=CLIENT, service="sidemesh-orchestrator")
    assert o_client.attributes["sidemesh.plugin"] == "assistant"
    a_server = _child(spans, o_client.span_id, kind=SERVER, service="assistant")
    # -> the agent's callback: assistant client -> orchestrator server -> client -> tools-demo
    by_id = _by_id(spans)

    def descends(span: mesh_pb2.TraceSpan, ancestor: str) -> bool:
        while span.parent_span_id in by_id:
            if span.parent_span_id == ancestor:
                return True
            span = by_id[span.parent_span_id]
        return False

    callback = next(s for s in spans if s.kind == CLIENT and s.service == "assistant")
    assert callback.name == "sidemesh.v1.ToolService/CallTool"
    assert descends(callback, a_server.span_id)
    cb_server = _child(spans, callback.span_id, kind=SERVER, service="sidemesh-orchestrator")
    assert cb_server.attributes["sidemesh.caller"] == "assistant"
    cb_client = _child(spans, cb_server.span_id, kind=CLIENT, service="sidemesh-orchestrator")
    tool = _child(spans, cb_client.span_id, kind=SERVER, service="tools-demo")
    assert tool.attributes["sidemesh.target"] == "add"
    assert {s.service for s in spans} == {"sidemesh-orchestrator", "assistant", "tools-demo"}


async def test_a_client_sending_traceparent_gets_its_trace_continued(make_mesh: MakeMesh) -> None:
    mesh = _mesh(make_mesh)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with grpc.aio.insecure_channel(mesh.address) as channel:  # no OpenTelemetry here
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.InvokeRequest(agent="workers/ticker")
        request.input.data.update({"count": 2})
        events = [
            e
            async for e in stub.Invoke(
                request, metadata=[("traceparent", f"00-{trace_id}-{parent}-01")]
            )
        ]
    assert events[-1].HasField("result")
    spans = _trace(mesh, trace_id, min_spans=3)
    server = _child(spans, parent, kind=SERVER, service="sidemesh-orchestrator")
    assert server.name == "sidemesh.v1.AgentService/Invoke"


async def test_errors_cancellation_and_deadlines_set_span_status_and_code(
    make_mesh: MakeMesh, client_tracer: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    mesh = _mesh(make_mesh)
    tracer, _ = client_tracer
    ids: dict[str, str] = {}
    async with AsyncMeshClient(mesh.address) as client:
        with tracer.start_as_current_span("not found") as span:
            with pytest.raises(NotFoundError):
                await client.call_tool("tools-demo/nope")
            ids["not_found"] = f"{span.get_span_context().trace_id:032x}"
        with tracer.start_as_current_span("deadline") as span:
            with pytest.raises(DeadlineExceededError):
                await client.call_tool("workers/sleepy", seconds=10, tag="t1", timeout=0.5)
            ids["deadline"] = f"{span.get_span_context().trace_id:032x}"
        with tracer.start_as_current_span("cancel") as span:
            task = asyncio.create_task(client.call_tool("workers/sleepy", seconds=10, tag="t2"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            ids["cancel"] = f"{span.get_span_context().trace_id:032x}"

    spans = _trace(mesh, ids["not_found"], min_spans=1)
    assert spans[0].error and spans[0].attributes["rpc.grpc.status_code"] == "5"
    assert "NOT_FOUND" in spans[0].status_message

    for case, code in (("deadline", "4"), ("cancel", "1")):
        spans = _trace(mesh, ids[case], min_spans=3)
        server = next(s for s in spans if s.kind == SERVER and s.service == "sidemesh-orchestrator")
        assert server.error, case
        assert server.attributes["rpc.grpc.status_code"] == code, case
        sidecar = wait_until(
            lambda c=case: next(
                (s for s in _trace(mesh, ids[c], 3) if s.service == "workers"), None
            ),
            10,
            f"the sidecar's span for {case}",
        )
        assert sidecar.error, case


async def test_spans_and_metrics_reach_a_real_otlp_receiver_and_match_the_store(
    make_mesh: MakeMesh,
    receiver: tuple[_Receiver, int],
    client_tracer: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    collector, port = receiver
    mesh = _mesh(
        make_mesh,
        telemetry={"otlp_endpoint": f"http://127.0.0.1:{port}", "metrics_interval": 0.5},
    )
    tracer, _ = client_tracer
    with tracer.start_as_current_span("export test") as root:
        async with AsyncMeshClient(mesh.address) as client:
            await client.invoke("assistant", "What is 1 + 2?").collect()
    trace_id = f"{root.get_span_context().trace_id:032x}"
    stored = _trace(mesh, trace_id, min_spans=7)
    stored_ids = {s.span_id for s in stored}

    def exported() -> set[str] | None:
        ids = {span for _, t, span in collector.spans() if t == trace_id}
        return ids if stored_ids <= ids else None

    wait_until(exported, 15, "the receiver to get every stored span")
    services = {svc for svc, t, _ in collector.spans() if t == trace_id}
    assert {"sidemesh-orchestrator", "assistant", "tools-demo"} <= services

    command = [sys.executable, "-m", "orchestrator.cli", "trace", trace_id, "-a", mesh.address]
    out = await asyncio.to_thread(
        subprocess.run, [*command, "-o", "json"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert {s["span_id"] for s in json.loads(out.stdout)} == stored_ids

    wait_until(
        lambda: (
            {"rpc.server.call.duration", "sidemesh.calls.in_flight"} <= collector.metric_names()
        ),
        15,
        "the call duration and in-flight metrics",
    )


async def test_an_otlp_endpoint_that_is_down_does_not_hold_up_shutdown(make_mesh: MakeMesh) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mesh = _mesh(
        make_mesh,
        telemetry={"otlp_endpoint": f"http://127.0.0.1:{port}", "metrics_interval": 0.5},
    )
    async with AsyncMeshClient(mesh.address) as client:
        await client.invoke("assistant", "What is 1 + 2?").collect()
    await asyncio.sleep(1)  # the exporters are retrying by now
    started = time.monotonic()
    assert mesh.stop() == 0, mesh.log()
    # The exporters get 2 s each for their last batch; the exporters' own retries
    # (1, 2, 4 s... up to 10 s a batch) would take longer.
    assert time.monotonic() - started < 8, mesh.log()
