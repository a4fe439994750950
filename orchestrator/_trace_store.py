"""The embedded trace store: recent spans from every process of the mesh, in SQLite.

Spans arrive as OTLP ``ExportTraceServiceRequest`` messages (from sidecars over
gRPC, and from the orchestrator's own tracer). One background thread writes
them; readers use their own connections. The store keeps the newest
``max_traces`` traces and drops older ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from clients import InvalidArgumentError, NotFoundError
from sidemesh.v1 import mesh_pb2

log = logging.getLogger("sidemesh.traces")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT NOT NULL,
    name TEXT NOT NULL,
    service TEXT NOT NULL,
    kind INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    error INTEGER NOT NULL,
    status_message TEXT NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_by_seq ON traces(seq);
CREATE INDEX IF NOT EXISTS spans_by_service ON spans(service, trace_id);
"""
_STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
_STOP = object()


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else None


def _text(value: AnyValue) -> str:
    plain = _value(value)
    return plain if isinstance(plain, str) else json.dumps(plain)


def _attributes(kvs: Any) -> dict[str, str]:
    return {kv.key: _text(kv.value) for kv in kvs}


def span_rows(request: ExportTraceServiceRequest) -> list[tuple[Any, ...]]:
    """One row per span of an OTLP export request."""
    rows = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name", "unknown_service")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                rows.append((
                    span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                    span.name, service, int(span.kind), span.start_time_unix_nano,
                    span.end_time_unix_nano, int(span.status.code == _STATUS_ERROR),
                    span.status.message, json.dumps(_attributes(span.attributes)),
                ))  # fmt: skip
    return rows


def stamp_resource(request: ExportTraceServiceRequest, key: str, value: str) -> None:
    """Sets resource attribute ``key`` on every batch of ``request`` (overwriting it)."""
    for resource_spans in request.resource_spans:
        attrs = resource_spans.resource.attributes
        for kv in attrs:
            if kv.key == key:
                kv.value.string_value = value
                break
        else:
            attrs.append(KeyValue(key=key, value=AnyValue(string_value=value)))


class TraceStore:
    """Recent traces in ``path`` (SQLite), at most ``max_traces`` of them."""

    def __init__(self, path: Path, max_traces: int) -> None:
        self._path = path
        self._max_traces = max_traces
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._dropped = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
        self._writer = threading.Thread(target=self._write_loop, name="trace-store", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=5, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    # -- writing ---------------------------------------------------------------

    def add(self, request: ExportTraceServiceRequest | list[tuple[Any, ...]]) -> None:
        """Queues spans for storage: an OTLP request, or rows (see :func:`span_rows`).

        Thread-safe; never blocks.
        """
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 100, 10_000):
                log.warning("trace store is behind: dropped %d span batches", self._dropped)

    def _write_loop(self) -> None:
        db = self._connect()
        pending = 0
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if isinstance(item, threading.Event):  # a flush marker
                item.set()
                continue
            try:
                rows = item if isinstance(item, list) else span_rows(item)
                with db:
                    db.executemany(
                        "INSERT OR REPLACE INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows
                    )
                    db.executemany(
                        "INSERT OR IGNORE INTO traces(trace_id, seq) "
                        "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM traces))",
                        {(r[0],) for r in rows},
                    )
                pending += len(rows)
                if pending > 500:
                    pending = 0
                    self._prune(db)
            except sqlite3.Error:
                log.exception("trace store: cannot write spans")
        self._prune(db)
        db.close()

    def _prune(self, db: sqlite3.Connection) -> None:
        with db:
            cutoff = db.execute(
                "SELECT seq FROM traces ORDER BY seq DESC LIMIT 1 OFFSET ?", (self._max_traces,)
            ).fetchone()
            if cutoff is not None:
                db.execute(
                    "DELETE FROM spans WHERE trace_id IN "
                    "(SELECT trace_id FROM traces WHERE seq <= ?)",
                    cutoff,
                )
                db.execute("DELETE FROM traces WHERE seq <= ?", cutoff)

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until everything queued so far is written."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Writes what is queued and stops the writer."""
        self._queue.put(_STOP)
        self._writer.join(10)

    # -- reading ---------------------------------------------------------------

    async def recent(self, limit: int, plugin: str = "") -> list[mesh_pb2.TraceSummary]:
        """The newest traces, newest first."""
        return await asyncio.to_thread(self._list, limit or 20, plugin)

    def _list(self, limit: int, plugin: str) -> list[mesh_pb2.TraceSummary]:
        self.flush()
        db = self._connect()
        try:
            where = (
                "WHERE t.trace_id IN (SELECT trace_id FROM spans WHERE service = ?)"
                if plugin
                else ""
            )
            args: tuple[Any, ...] = (plugin, limit) if plugin else (limit,)
            ids = [r[0] for r in db.execute(
                f"SELECT t.trace_id FROM traces t {where} ORDER BY t.seq DESC LIMIT ?", args
            )]  # fmt: skip
            return [self._summary(db, trace_id) for trace_id in ids]
        finally:
            db.close()

    def _summary(self, db: sqlite3.Connection, trace_id: str) -> mesh_pb2.TraceSummary:
        rows = db.execute(
            "SELECT span_id, parent_span_id, name, service, start_ns, end_ns, error FROM spans "
            "WHERE trace_id = ? ORDER BY start_ns",
            (trace_id,),
        ).fetchall()
        ids = {r[0] for r in rows}
        root = next((r for r in rows if r[1] not in ids), rows[0])
        start, end = min(r[4] for r in rows), max(r[5] for r in rows)
        summary = mesh_pb2.TraceSummary(
            trace_id=trace_id, root_name=root[2], root_service=root[3], span_count=len(rows),
            services=sorted({r[3] for r in rows}), error=any(r[6] for r in rows),
        )  # fmt: skip
        summary.start_time.FromNanoseconds(start)
        summary.duration.FromNanoseconds(end - start)
        return summary

    async def spans(self, trace_id: str) -> list[mesh_pb2.TraceSpan]:
        """Every stored span of the trace ``trace_id`` (or a unique prefix of 6+ digits)."""
        return await asyncio.to_thread(self._get, trace_id.strip().lower())

    def _get(self, trace_id: str) -> list[mesh_pb2.TraceSpan]:
        if not 6 <= len(trace_id) <= 32 or any(c not in "0123456789abcdef" for c in trace_id):
            raise InvalidArgumentError(
                f"{trace_id!r} is not a trace id: give its 32 hex digits, or a prefix of 6 or more"
            )
        self.flush()
        db = self._connect()
        try:
            matches = [r[0] for r in db.execute(
                "SELECT trace_id FROM traces WHERE trace_id >= ? AND trace_id < ? LIMIT 2",
                (trace_id, trace_id + "g"),
            )]  # fmt: skip
            if not matches:
                raise NotFoundError(
                    f"no trace {trace_id!r} in the store (it keeps the newest "
                    f"{self._max_traces}; see `sidemesh traces`)",
                    reason="TRACE_NOT_FOUND",
                )
            if len(matches) > 1:
                raise InvalidArgumentError(
                    f"trace id prefix {trace_id!r} is ambiguous: use more digits"
                )
            rows = db.execute(
                "SELECT * FROM spans WHERE trace_id = ? ORDER BY start_ns", (matches[0],)
            ).fetchall()
        finally:
            db.close()
        spans = []
        for row in rows:
            span = mesh_pb2.TraceSpan(
                trace_id=row[0], span_id=row[1], parent_span_id=row[2], name=row[3],
                service=row[4], kind=row[5], error=bool(row[8]), status_message=row[9],
                attributes=json.loads(row[10]),
            )  # fmt: skip
            span.start_time.FromNanoseconds(row[6])
            span.duration.FromNanoseconds(row[7] - row[6])
            spans.append(span)
        return spans
