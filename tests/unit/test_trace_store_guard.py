"""The trace store's rules against hostile senders: sources, known traces, bounds and quotas.

A plugin's spans arrive on its callback socket, where the orchestrator serves
``TraceService`` through :class:`OtlpReceiver`; here the receiver is served on
a temporary Unix socket and fed by the official OTLP protobufs (and raw bytes),
as a hostile sidecar would. What is asserted is what the operator sees:
``GetTrace``'s spans (via the store), the waterfall ``sidemesh trace`` prints,
the usage ``sidemesh plugins -v`` shows, the violations reported.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from orchestrator._config import TelemetrySettings
from orchestrator._otlp_receiver import forwardable
from orchestrator._span_rows import (
    MAX_ATTRIBUTES,
    MAX_NAME,
    MAX_SPANS_PER_EXPORT,
    row_size,
    rows_of,
)
from orchestrator._telemetry import Telemetry
from orchestrator._trace_sources import (
    EXPORT_BURST,
    EXPORT_BYTES_PER_SECOND,
    KnownTraces,
    Outcome,
    TraceSource,
)
from orchestrator._trace_store import TraceStore
from orchestrator.cli._inspect import trace_usage
from orchestrator.cli._traces import waterfall
from sidemesh.v1 import mesh_pb2

Request = trace_service_pb2.ExportTraceServiceRequest
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MIB = 1024 * 1024


class Mesh:
    """A Telemetry whose OTLP receiver is served on a socket, as on the orchestrator's own.

    An export from plugin NAME carries ``sidemesh-caller: NAME``, as the data
    plane sends it for what arrives on NAME's callback socket; a client's none.
    """

    def __init__(self, telemetry: Telemetry, channel: grpc.aio.Channel) -> None:
        self.telemetry = telemetry
        self.channel = channel
        self.violations: list[tuple[str, int, str]] = []
        telemetry.on_violation = lambda *v: self.violations.append(v)

    @property
    def store(self) -> TraceStore:
        assert self.telemetry.store is not None
        return self.telemetry.store

    @staticmethod
    def metadata(sender: str) -> tuple[tuple[str, str], ...]:
        return () if sender == "client" else (("sidemesh-caller", sender),)

    async def export(
        self, sender: str, request: Request
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        stub = trace_service_pb2_grpc.TraceServiceStub(self.channel)
        return await stub.Export(request, timeout=10, metadata=self.metadata(sender))

    async def export_code(
        self, sender: str, request: Request | bytes
    ) -> tuple[grpc.StatusCode, Any]:
        """The status code and response (or details) of one export."""
        call = self.channel.unary_unary(EXPORT)
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        try:
            raw = await call(payload, timeout=10, metadata=self.metadata(sender))
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()
        return grpc.StatusCode.OK, trace_service_pb2.ExportTraceServiceResponse.FromString(raw)

    def orchestrator_span(self, name: str = "sidemesh.v1.ToolService/CallTool") -> tuple[int, int]:
        """Stores one of the orchestrator's own spans (a data plane row); its trace and span id."""
        trace_id, span_id = _new_trace(), int.from_bytes(os.urandom(8), "big") | 1
        now = _now()
        row = (
            f"{trace_id:032x}", f"{span_id:016x}", "", name, self.telemetry.service, 3, now,
            now + 1000, 0, "", '{"sidemesh.plugin": "forger"}',
        )  # fmt: skip
        self.telemetry.add_rows([row])
        self.flush()
        return trace_id, span_id

    def flush(self) -> None:
        assert self.store.flush()

    async def trace(self, trace_id: int) -> list[mesh_pb2.TraceSpan]:
        spans, _ = await self.store.spans(f"{trace_id:032x}")
        return spans


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    settings = TelemetrySettings(export_delay_ms=1, max_store_mb=64, client_quota_mb=1)
    telemetry = Telemetry(settings, tmp_path / "state")
    telemetry.add_plugin("forger", quota_mb=1, replicas=2)
    telemetry.add_plugin("tools-demo", quota_mb=16)
    server = grpc.aio.server()
    telemetry.receiver().register(server)
    address = f"unix:{tmp_path}/internal.sock"
    server.add_insecure_port(address)
    await server.start()
    channel = grpc.aio.insecure_channel(address)
    yield Mesh(telemetry, channel)
    await channel.close()
    await server.stop(None)
    telemetry.shutdown()


def _span(
    trace_id: int | bytes,
    span_id: int | bytes | None = None,
    *,
    name: str = "forged",
    parent: int | bytes = b"",
    attributes: dict[str, Any] | None = None,
    start: int | None = None,
    end: int | None = None,
    kind: int = trace_pb2.Span.SPAN_KIND_SERVER,
) -> trace_pb2.Span:
    def raw(value: int | bytes, size: int) -> bytes:
        return value.to_bytes(size, "big") if isinstance(value, int) else value

    now = _now()
    span_id = os.urandom(8) if span_id is None else span_id
    span = trace_pb2.Span(
        trace_id=raw(trace_id, 16), span_id=raw(span_id, 8),
        parent_span_id=raw(parent, 8) if parent else b"", name=name, kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=now if start is None else start,
        end_time_unix_nano=now + 1000 if end is None else end,
    )  # fmt: skip
    for key, value in (attributes or {}).items():
        span.attributes.append(KeyValue(key=key, value=_value(value)))
    return span


def _value(value: Any) -> AnyValue:
    if isinstance(value, AnyValue):
        return value
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    return AnyValue(string_value=str(value))


def _request(*spans: trace_pb2.Span, service: str = "forger", replica: str = "1") -> Request:
    request = Request()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend([
        KeyValue(key="service.name", value=AnyValue(string_value=service)),
        KeyValue(key="sidemesh.replica", value=AnyValue(string_value=replica)),
    ])  # fmt: skip
    resource_spans.scope_spans.add().spans.extend(spans)
    return request


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


def _now() -> int:
    return time.time_ns()


def _new_trace() -> int:
    return int.from_bytes(os.urandom(16), "big") | 1


# -- identity: the source is the socket's, never the payload's ------------------------------


async def test_a_plugins_span_with_the_orchestrators_ids_never_replaces_it(mesh: Mesh) -> None:
    trace_id, span_id = mesh.orchestrator_span()
    mesh.telemetry.routed("forger", trace_id)
    forged = _span(trace_id, span_id, name="FORGED", attributes={"sidemesh.plugin": "tools-demo"})
    await mesh.export("forger", _request(forged, service="sidemesh-orchestrator"))
    # Again, changed: a source cannot replace its own span either (the first one stays).
    again = _span(trace_id, span_id, name="FORGED AGAIN")
    await mesh.export("forger", _request(again, service="sidemesh-orchestrator"))
    mesh.flush()

    spans = await mesh.trace(trace_id)
    mine = [s for s in spans if s.source == "orchestrator"]
    assert [(s.span_id, s.name, s.service) for s in mine] == [
        (f"{span_id:016x}", "sidemesh.v1.ToolService/CallTool", "sidemesh-orchestrator")
    ]
    theirs = [s for s in spans if s.source != "orchestrator"]
    assert [(s.source, s.service, s.name) for s in theirs] == [
        ("plugin:forger", "forger", "FORGED")
    ]
    assert theirs[0].attributes["sidemesh.claimed_service"] == "sidemesh-orchestrator"

    text = waterfall(spans)
    forged_line = next(line for line in text.splitlines() if "FORGED" in line)
    assert "plugin:forger" in forged_line and "reuses another source's span id" in forged_line
    real_line = next(line for line in text.splitlines() if "ToolService/CallTool" in line)
    assert " orchestrator " in real_line


async def test_a_client_cannot_pass_its_spans_off_as_the_orchestrators_or_a_plugins(
    mesh: Mesh,
) -> None:
    trace_id = _new_trace()  # clients start their own traces: any trace id is theirs to use
    spans = [_span(trace_id, name="cli"), _span(trace_id, name="cli 2")]
    await mesh.export("client", _request(spans[0], service="sidemesh-orchestrator"))
    await mesh.export("client", _request(spans[1], service="tools-demo"))
    mesh.flush()
    stored = await mesh.trace(trace_id)
    assert sorted((s.source, s.service) for s in stored) == [
        ("client", "sidemesh-orchestrator (client)"),
        ("client", "tools-demo (client)"),
    ]


async def test_spans_from_the_callback_socket_of_an_unknown_plugin_are_refused(
    mesh: Mesh,
) -> None:
    code, details = await mesh.export_code("stranger", _request(_span(_new_trace())))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'stranger'" in details


# -- which traces a plugin may add spans to -----------------------------------------------


async def test_spans_for_traces_never_routed_to_the_plugin_are_refused_and_reported(
    mesh: Mesh,
) -> None:
    victim, _ = mesh.orchestrator_span()
    mesh.telemetry.routed("tools-demo", victim)  # someone else's trace
    code, details = await mesh.export_code("forger", _request(_span(victim)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "never routed to it" in details

    own = _new_trace()
    mesh.telemetry.routed("forger", own)
    code, response = await mesh.export_code("forger", _request(_span(own), _span(victim)))
    assert code == grpc.StatusCode.OK
    assert response.partial_success.rejected_spans == 1
    assert "never routed to it" in response.partial_success.error_message
    mesh.flush()

    assert [s.source for s in await mesh.trace(victim)] == ["orchestrator"]
    assert [s.source for s in await mesh.trace(own)] == ["plugin:forger"]
    usage = mesh.telemetry.trace_usage("forger")
    assert usage is not None
    assert (usage.refused_unknown_trace, usage.spans_refused, usage.spans_accepted) == (2, 2, 1)
    assert "2 refused (0 over quota, 2 for traces not its own, 0 malformed)" in trace_usage(usage)
    # Reported once at once (replica 1, as its resource said), then no more than every 10 s.
    assert len(mesh.violations) == 1
    plugin, replica, detail = mesh.violations[0]
    assert (plugin, replica) == ("forger", 1) and "never routed to it" in detail


async def test_a_callback_makes_a_trace_the_callers_only_when_no_other_plugin_has_it(
    mesh: Mesh,
) -> None:
    theirs, started = _new_trace(), _new_trace()
    mesh.telemetry.routed("tools-demo", theirs)
    # forger calls back with another plugin's trace id (it may have read it anywhere)...
    mesh.telemetry.routed("tools-demo", theirs, caller="forger")
    # ... and with a trace it started itself.
    mesh.telemetry.routed("tools-demo", started, caller="forger")
    code, _ = await mesh.export_code("forger", _request(_span(theirs)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = await mesh.export_code("forger", _request(_span(started)))
    assert code == grpc.StatusCode.OK


def test_the_traces_a_plugin_knows_are_bounded() -> None:
    known = KnownTraces(size=3)
    for trace_id in (1, 2, 3, 1, 4):
        known.add(trace_id)
    assert len(known) == 3
    assert 2 not in known and {1, 3, 4} == {t for t in (1, 2, 3, 4) if t in known}


# -- bounds ------------------------------------------------------------------------------


async def test_a_plugin_over_its_quota_is_refused_reported_and_others_keep_storing(
    mesh: Mesh,
) -> None:
    trace_id = _new_trace()
    mesh.telemetry.routed("forger", trace_id)
    big = {f"k{i}": "v" * 900 for i in range(6)}  # about 5.5 KiB stored per span
    codes = []
    for _ in range(12):  # 12 x 50 spans: 3 MiB against a quota of 1 MiB
        spans = [_span(trace_id, attributes=big) for _ in range(50)]
        code, _ = await mesh.export_code("forger", _request(*spans))
        codes.append(code)
    assert codes[0] == grpc.StatusCode.OK
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    mesh.flush()

    usage = mesh.telemetry.trace_usage("forger")
    assert usage is not None
    assert usage.bytes_quota == 1 * MIB
    assert 0.9 * MIB < usage.bytes_used <= usage.bytes_quota
    assert usage.refused_over_quota >= 400
    assert "over its trace quota" in usage.last_refusal
    assert len(mesh.violations) == 1  # once, not per export
    assert "over its trace quota (1.0 of 1 MiB used)" in mesh.violations[0][2]
    assert "traces: 1.0 of 1 MiB quota" in trace_usage(usage)

    # The orchestrator and the other plugins still store their spans.
    other, _ = mesh.orchestrator_span()
    mesh.telemetry.routed("tools-demo", other)
    assert (await mesh.export_code("tools-demo", _request(_span(other), service="tools-demo")))[
        0
    ] == grpc.StatusCode.OK
    mesh.flush()
    assert sorted(s.source for s in await mesh.trace(other)) == [
        "orchestrator",
        "plugin:tools-demo",
    ]


async def test_spans_are_cut_to_their_bounds_and_say_so(mesh: Mesh) -> None:
    trace_id = _new_trace()
    mesh.telemetry.routed("forger", trace_id)
    deep = AnyValue(string_value="bottom")
    for _ in range(40):  # protobuf refuses ~100 levels of messages (2 per level here)
        deep = AnyValue(array_value={"values": [deep, AnyValue(int_value=1)]})
    attributes: dict[str, Any] = {f"a{i}": i for i in range(5000)}
    attributes["deep"] = deep
    attributes["k" * 10_000] = "v" * 100_000
    span = _span(
        trace_id, name="n" * 100_000, attributes=attributes, start=2**64 - 1, end=0, kind=99
    )
    span.status.message = "s" * 100_000
    span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
    span.events.add(name="e" * 100_000)
    code, _ = await mesh.export_code("forger", _request(span, service="x" * 100_000))
    assert code == grpc.StatusCode.OK
    mesh.flush()

    (stored,) = await mesh.trace(trace_id)
    assert len(stored.name) == MAX_NAME and stored.name.endswith("…")
    assert len(stored.status_message) <= 512 and stored.error
    assert len(stored.attributes) <= MAX_ATTRIBUTES + 2  # + sidemesh.truncated, claimed_service
    assert len(stored.attributes["sidemesh.claimed_service"]) <= 1024
    truncated = stored.attributes["sidemesh.truncated"]
    for what in ("name", "status_message", "attributes dropped", "time"):
        assert what in truncated
    assert stored.kind == mesh_pb2.SPAN_KIND_UNSPECIFIED
    assert stored.duration.ToNanoseconds() >= 0
    assert abs(stored.start_time.ToNanoseconds() - _now()) < 120 * 10**9
    assert sum(len(k) + len(v) for k, v in stored.attributes.items()) < 10_000


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe not protobuf at all", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad utf-8", grpc.StatusCode.INVALID_ARGUMENT),
        ("too deep", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad ids", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_malformed_exports_are_refused_and_the_store_keeps_working(
    mesh: Mesh, payload: bytes | str, code: grpc.StatusCode
) -> None:
    trace_id = _new_trace()
    mesh.telemetry.routed("forger", trace_id)
    if payload == "bad utf-8":
        payload = (
            _request(_span(trace_id, name="ABCDEF"))
            .SerializeToString()
            .replace(b"ABCDEF", b"AB\xff\xfeEF")
        )
    elif payload == "too deep":  # deeper than protobuf decodes: only raw bytes get there
        deep = AnyValue(string_value="x").SerializeToString()
        for _ in range(200):
            deep = _field(5, _field(1, deep))  # AnyValue.array_value.values[0]
        span = _span(trace_id).SerializeToString() + _field(9, _field(1, b"deep") + _field(2, deep))
        payload = _field(1, _field(2, _field(2, span)))  # request > resource > scope > span
    elif payload == "bad ids":
        payload = _request(
            _span(trace_id.to_bytes(16, "big")[:15]), _span(trace_id, b"\0" * 8), _span(0),
            _span(trace_id, parent=b"\1\2\3"),
        ).SerializeToString()  # fmt: skip
    assert isinstance(payload, bytes)
    got, details = await mesh.export_code("forger", payload)
    assert got == code, details

    usage = mesh.telemetry.trace_usage("forger")
    assert usage is not None and usage.refused_malformed >= 1
    # The writer survived: the orchestrator's spans and a good span of the plugin are stored.
    mine, _ = mesh.orchestrator_span()
    mesh.telemetry.routed("forger", mine)
    assert (await mesh.export_code("forger", _request(_span(mine))))[0] == grpc.StatusCode.OK
    mesh.flush()
    assert sorted(s.source for s in await mesh.trace(mine)) == ["orchestrator", "plugin:forger"]


async def test_an_export_carries_a_bounded_number_of_spans(mesh: Mesh) -> None:
    trace_id = _new_trace()
    mesh.telemetry.routed("tools-demo", trace_id)
    spans = [_span(trace_id, name="s") for _ in range(MAX_SPANS_PER_EXPORT + 500)]
    code, response = await mesh.export_code("tools-demo", _request(*spans, service="tools-demo"))
    assert code == grpc.StatusCode.OK
    assert response.partial_success.rejected_spans == 500
    mesh.flush()
    assert len(await mesh.trace(trace_id)) == MAX_SPANS_PER_EXPORT


# -- the store ---------------------------------------------------------------------------


def _rows(
    traces: int, per_trace: int, attribute: int, source: str | None = None
) -> list[list[tuple[Any, ...]]]:
    """Batches of rows, one trace each: the orchestrator's own (``source`` None), or charged."""
    batches = []
    for _ in range(traces):
        trace_id = os.urandom(16).hex()
        text = '{"a": "' + "x" * attribute + '"}'
        rows = [
            (trace_id, os.urandom(8).hex(), "", "span", "svc", 2, 1, 2, 0, "", text)
            for _ in range(per_trace)
        ]
        if source is not None:
            rows = [(*row, source, row_size("span", "svc", "", text, source)) for row in rows]
        batches.append(rows)
    return batches


def test_the_store_is_bounded_by_telemetry_max_store_mb(mesh: Mesh) -> None:
    assert mesh.store.max_bytes == 64 * MIB


def test_the_store_evicts_the_oldest_traces_to_stay_within_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    store = TraceStore(path, max_traces=100_000, max_bytes=2 * MIB)
    batches = _rows(400, 5, 5000)  # about 10 MiB
    for batch in batches:
        store.add_own(batch)
    assert store.flush(30)
    assert store.total_bytes <= 2 * MIB
    assert path.stat().st_size <= 2 * MIB + 512 * 1024  # the last batch may overshoot
    db = sqlite3.connect(path)
    kept = {r[0] for r in db.execute("SELECT trace_id FROM traces")}
    assert batches[-1][0][0] in kept and batches[0][0][0] not in kept
    (size,) = db.execute("SELECT SUM(size) FROM spans").fetchone()
    assert size == store.total_bytes == store.used("orchestrator")  # the ledger is exact
    # SQLite charged the orchestrator's rows as row_size counts them.
    (one,) = db.execute("SELECT DISTINCT size FROM spans").fetchone()
    assert one == row_size("span", "svc", "", batches[-1][0][-1], "orchestrator")
    db.close()
    store.close()
    reopened = TraceStore(path, max_traces=100_000, max_bytes=2 * MIB)
    assert reopened.used("orchestrator") == size
    reopened.close()


async def test_traces_are_listed_newest_first_and_by_the_plugin_that_took_part(
    tmp_path: Path,
) -> None:
    store = TraceStore(tmp_path / "traces.db", max_traces=10)
    alone, shared, newest = _rows(3, 2, 10)
    for batch in (alone, shared, newest):
        store.add_own(batch)
    (plugin_rows,) = _rows(1, 1, 10, source="plugin:files")
    store.add([(shared[0][0], *plugin_rows[0][1:])])  # a span of plugin files in `shared`
    ids = [t.trace_id for t in await store.recent(10)]
    assert ids == [newest[0][0], shared[0][0], alone[0][0]]
    (summary,) = await store.recent(10, plugin="files")
    assert summary.trace_id == shared[0][0] and summary.span_count == 3
    assert summary.root_source == "orchestrator"  # the plugin's span is not the root
    assert await store.recent(10, plugin="other") == []
    store.close()


def test_the_ledger_refunds_duplicates_and_evictions(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "traces.db", max_traces=2)
    (batch,) = _rows(1, 3, 10, source="plugin:forger")
    for _ in range(2):  # the same spans twice: stored once
        assert all(store.charge("plugin:forger", row[-1], 10 * MIB) for row in batch)
        store.add(batch)
    assert store.flush()
    assert store.used("plugin:forger") == sum(row[-1] for row in batch)
    for later in _rows(600, 1, 10):  # more traces than max_traces: the first goes
        store.add_own(later)
    assert store.flush()
    store.close()  # prunes
    assert TraceStore(tmp_path / "traces.db", max_traces=2).used("plugin:forger") == 0
    assert store.used("plugin:forger") == 0


def test_a_store_of_the_old_schema_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE spans (trace_id TEXT, span_id TEXT, parent_span_id TEXT, name TEXT,"
        " service TEXT, kind INTEGER, start_ns INTEGER, end_ns INTEGER, error INTEGER,"
        " status_message TEXT, attributes TEXT, PRIMARY KEY (trace_id, span_id));"
        "CREATE TABLE traces (trace_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
        "INSERT INTO spans VALUES ('ab', 'cd', '', 'old', 'svc', 1, 1, 2, 0, '', '{}');"
    )
    db.commit()
    db.close()
    store = TraceStore(path, max_traces=10)
    (batch,) = _rows(1, 1, 10)
    store.add_own(batch)
    assert store.flush()
    store.close()
    assert sqlite3.connect(path).execute("SELECT source FROM spans").fetchall() == [
        ("orchestrator",)
    ]


async def test_a_plugin_cannot_become_the_root_nor_stretch_the_trace(mesh: Mesh) -> None:
    trace_id, _ = mesh.orchestrator_span("sidemesh.v1.AgentService/Invoke")
    mesh.telemetry.routed("forger", trace_id)
    hour = 3600 * 10**9
    early = _span(trace_id, name="I AM THE ROOT", start=_now() - 10 * hour, end=_now() + 30 * 10**9)
    await mesh.export("forger", _request(early))
    mesh.flush()
    (summary,) = [t for t in await mesh.store.recent(10) if t.trace_id == f"{trace_id:032x}"]
    assert (summary.root_name, summary.root_source) == (
        "sidemesh.v1.AgentService/Invoke",
        "orchestrator",
    )
    assert summary.duration.ToNanoseconds() < 10**9


# -- what `sidemesh trace` prints -------------------------------------------------------------


def _trace_span(
    span_id: str, parent: str, source: str, name: str, start: int, length: int
) -> mesh_pb2.TraceSpan:
    span = mesh_pb2.TraceSpan(
        trace_id="ab" * 16, span_id=span_id, parent_span_id=parent, name=name, source=source,
        service=source.removeprefix("plugin:"), kind=mesh_pb2.SPAN_KIND_SERVER,
    )  # fmt: skip
    span.start_time.FromNanoseconds(start)
    span.duration.FromNanoseconds(length)
    return span


def test_the_waterfall_escapes_text_and_never_hangs_a_span_under_a_forged_parent() -> None:
    t = 10**18
    spans = [
        _trace_span("01" * 8, "", "orchestrator", "server", t, 10**6),
        _trace_span("02" * 8, "01" * 8, "orchestrator", "client", t + 10, 10**6 - 20),
        _trace_span("03" * 8, "02" * 8, "plugin:tools-demo", "sidecar", t + 20, 10**5),
        # A plugin's span with the orchestrator client span's id, years early, and a name
        # that would clear the screen and print a line of its own.
        _trace_span(
            "02" * 8, "01" * 8, "plugin:evil", "x\x1b[2J\nserver (server)  orchestrator", 0, 1
        ),
    ]
    text = waterfall(spans)
    assert "\x1b" not in text and "\\x1b[2J\\x0aserver" in text
    lines = text.splitlines()
    assert len(lines) == 2 + len(spans)  # heading, header, one line per span
    sidecar = next(i for i, line in enumerate(lines) if "sidecar" in line)
    assert lines[sidecar - 1].lstrip().startswith("├─ client") or "client" in lines[sidecar - 1]
    assert "plugin:evil" not in lines[sidecar - 1]
    server = next(line for line in lines if line.startswith("server"))
    assert "|" + "█" * 32 + "|" in server  # the scale is the orchestrator's, not the forger's


def test_the_waterfall_draws_a_thousands_deep_or_looping_trace() -> None:
    spans = [
        _trace_span(f"{i + 1:016x}", f"{i:016x}" if i else "", "plugin:evil", "deep", i, 1)
        for i in range(5000)
    ]
    spans.append(_trace_span("ff" * 8, "ff" * 8, "plugin:evil", "loop", 0, 1))
    text = waterfall(spans)
    assert len(text.splitlines()) == 2 + len(spans)
    assert "its parent is its own descendant" in text


def test_what_is_forwarded_to_an_otlp_endpoint_is_what_was_stored() -> None:
    trace_id = _new_trace()
    small = _span(trace_id, name="small")
    small.events.add(name="kept")
    huge = _span(trace_id, name="h" * 5000, attributes={"big": "v" * 100_000})
    huge.events.add(name="e" * 100_000)
    request = _request(small, huge, service="sidemesh-orchestrator")
    batch = rows_of(request, "plugin:forger", _now(), service="forger")
    out = forwardable(request, batch, [0, 1], "plugin:forger")
    (resource_spans,) = out.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource == {
        "service.name": "forger",
        "sidemesh.source": "plugin:forger",
        "sidemesh.plugin": "forger",
    }
    sent_small, sent_huge = resource_spans.scope_spans[0].spans
    assert sent_small == small  # as it came
    assert len(sent_huge.name) == MAX_NAME and not sent_huge.events
    assert sent_huge.ByteSize() < 16 * 1024


async def test_a_plugin_sending_too_fast_is_told_to_retry_later_unread(mesh: Mesh) -> None:
    assert mesh.telemetry.sources is not None
    source = mesh.telemetry.sources.plugins["forger"]
    # A full bucket lets even more than itself through: five seconds' worth too many.
    assert source.throttle(EXPORT_BURST + 5 * EXPORT_BYTES_PER_SECOND) == 0
    trace_id = _new_trace()
    mesh.telemetry.routed("forger", trace_id)
    call = mesh.channel.unary_unary(EXPORT)
    payload = _request(_span(trace_id)).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(payload, timeout=10, metadata=mesh.metadata("forger"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(refused.value.trailing_metadata() or ())
    retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert 1e9 < retry.retry_delay.ToNanoseconds() <= 5e9
    usage = mesh.telemetry.trace_usage("forger")
    assert usage is not None and usage.exports_throttled == 1 and usage.spans_refused == 0
    assert "1 exports throttled" in trace_usage(usage)
    # Refilled five seconds later.
    assert source.throttle(1, now=time.monotonic() + 5) == 0


def test_refusals_are_reported_at_once_then_summed_per_reason(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "traces.db", max_traces=10)
    source = TraceSource(store, "plugin:forger", plugin="forger", quota_bytes=MIB)
    source.count(Outcome(unknown_trace=1))
    detail, later = source.report(now=100.0)
    assert "1 for traces never routed to it" in detail and later is None
    source.count(Outcome(unknown_trace=5))
    assert source.report(now=101.0) == ("", 9.0)  # held back...
    source.count(Outcome(over_quota=3))  # ... but another reason is reported at once
    detail, later = source.report(now=102.0)
    assert "3 over its trace quota" in detail and "never routed" not in detail
    assert later == 8.0
    detail, later = source.report(now=110.0)  # the held-back ones, summed
    assert "5 for traces never routed to it" in detail and later is None
    assert source.report(now=111.0) == ("", None)
    store.close()
