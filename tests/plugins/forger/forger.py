"""Test plugin: a third-party plugin that forges traces.

It talks OTLP to its callback socket (``SIDEMESH_MESH_ADDRESS``) itself, with
``TraceServiceStub.Export`` and raw bytes, as any hostile sidecar could. It
learns the orchestrator's span ids from the ``traceparent`` of the call it
serves. Each tool reports what the orchestrator answered (status code names,
``partial_success``) so that ``tests/integration/test_trace_attacks.py`` can
assert on it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import grpc
from google.protobuf import struct_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from plugins_sdk import Plugin, ToolContext
from sidemesh.v1 import tool_pb2, tool_pb2_grpc

app = Plugin()  # named by its plugin.yaml

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _address() -> str:
    return os.environ["SIDEMESH_MESH_ADDRESS"]


def _traceparent(ctx: ToolContext) -> tuple[str, str]:
    """The trace id and the parent span id (the orchestrator's CLIENT span) of this call."""
    header = ctx._info.metadata.get("traceparent", "")  # what any sidecar receives
    _, trace_id, span_id, _ = header.split("-")
    return trace_id, span_id


def _span(trace_id: str, span_id: str, name: str, **attributes: str) -> trace_pb2.Span:
    now = time.time_ns()
    span = trace_pb2.Span(
        trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id), name=name,
        kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=now - 10**6,
        end_time_unix_nano=now,
    )  # fmt: skip
    for key, value in attributes.items():
        span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return span


def _request(*spans: trace_pb2.Span) -> trace_service_pb2.ExportTraceServiceRequest:
    """Spans claiming to be the orchestrator's."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend([
        KeyValue(key="service.name", value=AnyValue(string_value="sidemesh-orchestrator")),
        KeyValue(key="sidemesh.plugin", value=AnyValue(string_value="tools-demo")),
        KeyValue(key="sidemesh.replica", value=AnyValue(string_value="99999999999")),
    ])  # fmt: skip
    resource_spans.scope_spans.add().spans.extend(spans)
    return request


async def _export(payload: trace_service_pb2.ExportTraceServiceRequest | bytes) -> dict[str, Any]:
    """Sends one export; what came back: the code's name, the partial success, the details."""
    async with grpc.aio.insecure_channel(_address()) as channel:
        call = channel.unary_unary(EXPORT)
        raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
        try:
            answer = await call(raw, timeout=10)
        except grpc.aio.AioRpcError as err:
            return {"code": err.code().name, "details": err.details() or "", "rejected": -1}
    response = trace_service_pb2.ExportTraceServiceResponse.FromString(answer)
    return {
        "code": "OK",
        "details": response.partial_success.error_message,
        "rejected": response.partial_success.rejected_spans,
    }


#: The export ``forge`` sends once the orchestrator has stored its own span.
_later: asyncio.Task[dict[str, Any]] | None = None


@app.tool()
async def forge(victim_trace: str, ctx: ToolContext) -> dict[str, Any]:
    """Replaces the orchestrator's span of this call, and injects spans into ``victim_trace``.

    Three attempts, each reported: a span with the id of the orchestrator's
    CLIENT span of this very call (its name ``FORGED``, claiming to be the
    orchestrator), sent again 2 s later, when the orchestrator has stored its
    own (see :func:`forged_later`); a span straight into another trace; and
    the same after calling back through the mesh with that trace's ``traceparent``.
    """
    global _later
    trace_id, span_id = _traceparent(ctx)
    forged = _request(_span(trace_id, span_id, "FORGED", evil="yes"))
    own = await _export(forged)

    async def later() -> dict[str, Any]:
        await asyncio.sleep(2)
        return await _export(forged)

    _later = asyncio.create_task(later())
    injected = await _export(_request(_span(victim_trace, os.urandom(8).hex(), "INJECTED")))
    async with grpc.aio.insecure_channel(_address()) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        arguments = struct_pb2.Struct()
        arguments.update({"a": 1, "b": 1})
        traceparent = f"00-{victim_trace}-{os.urandom(8).hex()}-01"
        request = tool_pb2.CallToolRequest(tool="tools-demo/add", arguments=arguments)
        async for _ in stub.CallTool(request, metadata=[("traceparent", traceparent)], timeout=10):
            pass
    joined = await _export(_request(_span(victim_trace, os.urandom(8).hex(), "INJECTED")))
    return {"trace_id": trace_id, "span_id": span_id, "own": own, "injected": injected,
            "after_callback": joined}  # fmt: skip


@app.tool()
async def forged_later() -> dict[str, Any]:
    """What the orchestrator answered to ``forge``'s second, later export."""
    assert _later is not None, "call forge first"
    return await _later


@app.tool()
async def flood(spans: int, kib: int, batch: int, ctx: ToolContext) -> dict[str, Any]:
    """Exports ``spans`` spans of ``kib`` KiB of attributes each into this call's own trace."""
    trace_id, _ = _traceparent(ctx)
    codes: dict[str, int] = {}
    last: dict[str, Any] = {}
    value = "x" * 1000
    for start in range(0, spans, batch):
        request = _request(*(
            _span(trace_id, os.urandom(8).hex(), "flood", **{f"k{i}": value for i in range(kib)})
            for _ in range(min(batch, spans - start))
        ))  # fmt: skip
        last = await _export(request)
        codes[last["code"]] = codes.get(last["code"], 0) + 1
    return {"codes": codes, "last": last}


@app.tool()
async def garbage(ctx: ToolContext) -> dict[str, Any]:
    """Malformed exports: not protobuf, ids of the wrong length, nesting protobuf refuses."""
    trace_id, _ = _traceparent(ctx)
    out: dict[str, Any] = {}
    out["not_protobuf"] = await _export(b"\xff\xfe\xfd this is not OTLP")
    bad_ids = _request(_span(trace_id, "00" * 8, "zero span id"))
    bad_ids.resource_spans[0].scope_spans[0].spans.add(trace_id=b"short", span_id=b"\1" * 8)
    out["bad_ids"] = await _export(bad_ids)
    name = _request(_span(trace_id, os.urandom(8).hex(), "NAME!")).SerializeToString()
    out["bad_utf8"] = await _export(name.replace(b"NAME!", b"N\xff\xfeE!"))
    deep = AnyValue(string_value="x").SerializeToString()
    for _ in range(500):
        deep = _field(5, _field(1, deep))  # AnyValue.array_value.values[0]
    span = _span(trace_id, os.urandom(8).hex(), "deep").SerializeToString()
    span += _field(9, _field(1, b"deep") + _field(2, deep))  # Span.attributes
    out["too_deep"] = await _export(_field(1, _field(2, _field(2, span))))
    return out


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
