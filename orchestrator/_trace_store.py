"""The embedded trace store: recent spans from every process of the mesh, in SQLite.

Spans arrive as rows: the orchestrator's own (:meth:`TraceStore.add_own`, as
its tracer and the data plane make them), and those of plugins and clients
after :mod:`orchestrator._trace_sources` admitted them (:meth:`TraceStore.add`).
Every row has a source the orchestrator set (``orchestrator``, ``plugin:NAME``,
``client``), and a span is keyed by (trace id, span id, source): a span from
one source never replaces or removes another source's span, whatever ids it
carries; within a source the first one stays (``INSERT OR IGNORE``).

One background thread writes; readers use their own connections. The store
keeps the newest ``max_traces`` traces within ``max_bytes`` (evicting the
oldest traces) and counts the bytes each source's rows take, so that quotas
cost no query: :meth:`TraceStore.charge` reserves bytes before rows are
queued, the writer refunds what it did not insert and what eviction removed.
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

from orchestrator._span_rows import CLIENT, ORCHESTRATOR, PLUGIN_PREFIX, ROW_OVERHEAD, Row
from sidemesh.core import InvalidArgumentError, NotFoundError
from sidemesh.v1 import mesh_pb2

log = logging.getLogger("sidemesh.traces")

OwnRow = tuple[str, str, str, str, str, int, int, int, int, str, str]
"""One of the orchestrator's spans: a :data:`Row` without source and size (the data
plane's ``SpanRow``): trace_id, span_id, parent_span_id, name, service, kind, start_ns,
end_ns, error, status_message, attributes (JSON)."""

#: Most the write-ahead log keeps after a checkpoint (it holds one batch more at most).
WAL_BYTES = 8 << 20
#: Bumped when the schema changes; an older store is started afresh.
SCHEMA_VERSION = 2
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
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (trace_id, span_id, source)
);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_by_seq ON traces(seq);
CREATE INDEX IF NOT EXISTS spans_by_source ON spans(source, trace_id);
"""
_INSERT = "INSERT OR IGNORE INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
#: The orchestrator's rows get their source, and their size as ``row_size`` counts it.
_OWN_TEXT = " + ".join(f"length(CAST(?{i} AS BLOB))" for i in (4, 5, 10, 11))
_INSERT_OWN = (
    f"INSERT OR IGNORE INTO spans VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, "
    f"'{ORCHESTRATOR}', {ROW_OVERHEAD} + ({_OWN_TEXT} + {len(ORCHESTRATOR)}) * 7 / 6)"
)
_SIZE = 12  # the row's size column
_SOURCE = 11
#: Evicting for bytes goes down to this share of the bound, so it does not run per batch.
_EVICT_TO = 0.9
#: Traces evicted at once while the store is over its byte bound.
_EVICT_CHUNK = 64
#: Sources whose spans decide a trace's root and time span (a plugin's cannot).
_TRUSTED = frozenset({ORCHESTRATOR, CLIENT})
#: Most bytes of rows one ``GetTrace`` answer holds (the orchestrator's spans always fit).
MAX_ANSWER_BYTES = 8 << 20
_STOP = object()


class TraceStore:
    """Recent traces in ``path`` (SQLite): at most ``max_traces`` of them, in ``max_bytes``."""

    def __init__(self, path: Path, max_traces: int, max_bytes: int = 256 << 20) -> None:
        self._path = path
        self._max_traces = max_traces
        self.max_bytes = max_bytes
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._dropped = 0
        self._ledger = threading.Lock()
        self._bytes: dict[str, int] = {}
        self._total = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            self._migrate(db)
            db.executescript(_SCHEMA)
            for source, size in db.execute("SELECT source, SUM(size) FROM spans GROUP BY source"):
                self._bytes[source] = size
                self._total += size
        self._writer = threading.Thread(target=self._write_loop, name="trace-store", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=5, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # The write-ahead log is checkpointed every 1000 pages (SQLite's default, ~4 MiB) and
        # shrinks back to WAL_BYTES after a large batch; checkpointing more often cost the
        # writer 20-40% more CPU per span.
        db.execute(f"PRAGMA journal_size_limit={WAL_BYTES}")
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'spans'").fetchone():
            log.info("trace store %s has an older schema: starting it afresh", self._path)
            db.executescript("DROP TABLE IF EXISTS spans; DROP TABLE IF EXISTS traces;")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- accounting --------------------------------------------------------------

    def used(self, source: str) -> int:
        """Bytes the rows of ``source`` take in the store (and queued for it)."""
        return self._bytes.get(source, 0)

    @property
    def total_bytes(self) -> int:
        """Bytes every row takes, queued ones included."""
        return self._total

    def charge(self, source: str, size: int, limit: int | None = None) -> bool:
        """Reserves ``size`` bytes for a row of ``source``; False when ``limit`` forbids it."""
        with self._ledger:
            used = self._bytes.get(source, 0)
            if limit is not None and used + size > limit:
                return False
            self._bytes[source] = used + size
            self._total += size
            return True

    def _refund(self, sizes: dict[str, int]) -> None:
        with self._ledger:
            for source, size in sizes.items():
                self._bytes[source] = max(0, self._bytes.get(source, 0) - size)
                self._total = max(0, self._total - size)

    # -- writing ---------------------------------------------------------------

    def add(self, rows: list[Row]) -> None:
        """Queues rows of plugins or clients (see :data:`Row`) whose bytes are charged.

        Thread-safe; never blocks.
        """
        self._put((rows, True))

    def add_own(self, rows: list[OwnRow]) -> None:
        """Queues the orchestrator's own rows: :data:`OwnRow`, without source and size.

        Their bytes are counted when they are written, by SQLite. Thread-safe;
        never blocks.
        """
        self._put((rows, False))

    def _put(self, item: tuple[list[Any], bool]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += 1
            rows, charged = item
            if charged:
                self._refund(_sizes(rows))
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
            rows, charged = item
            try:
                self._write(db, rows, charged)
                pending += len(rows)
                if pending > 500:
                    pending = 0
                    self._prune(db)
                if self._total > self.max_bytes or self._file_bytes(db) > self.max_bytes:
                    self._evict_bytes(db)
            except sqlite3.Error:
                log.exception("trace store: cannot write spans")
        self._prune(db)
        db.close()

    def _write(self, db: sqlite3.Connection, rows: list[Any], charged: bool) -> None:
        with db:
            if charged:
                # Row by row: a span already stored (from the same source) is ignored and
                # its reserved bytes refunded.
                ignored: dict[str, int] = {}
                for row in rows:
                    if db.execute(_INSERT, row).rowcount != 1:
                        ignored[row[_SOURCE]] = ignored.get(row[_SOURCE], 0) + row[_SIZE]
                if ignored:
                    self._refund(ignored)
            else:
                # The new rows are those past the last rowid; SQLite sums what they were charged.
                (last,) = db.execute("SELECT COALESCE(MAX(rowid), 0) FROM spans").fetchone()
                db.executemany(_INSERT_OWN, rows)
                (size,) = db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM spans WHERE rowid > ?", (last,)
                ).fetchone()
                with self._ledger:
                    self._bytes[ORCHESTRATOR] = self._bytes.get(ORCHESTRATOR, 0) + size
                    self._total += size
            db.executemany(
                "INSERT OR IGNORE INTO traces(trace_id, seq) "
                "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM traces))",
                {(r[0],) for r in rows},
            )

    def _evict(self, db: sqlite3.Connection, cutoff: int) -> None:
        """Removes every trace with ``seq <= cutoff``, and their bytes from the ledger."""
        freed: dict[str, int] = {}
        with db:
            for source, size in db.execute(
                "DELETE FROM spans WHERE trace_id IN (SELECT trace_id FROM traces WHERE seq <= ?) "
                "RETURNING source, size",
                (cutoff,),
            ):
                freed[source] = freed.get(source, 0) + size
            db.execute("DELETE FROM traces WHERE seq <= ?", (cutoff,))
        self._refund(freed)

    def _prune(self, db: sqlite3.Connection) -> None:
        """Keeps the newest ``max_traces`` traces."""
        cutoff = db.execute(
            "SELECT seq FROM traces ORDER BY seq DESC LIMIT 1 OFFSET ?", (self._max_traces,)
        ).fetchone()
        if cutoff is not None:
            self._evict(db, cutoff[0])

    def _evict_bytes(self, db: sqlite3.Connection) -> None:
        """Evicts the oldest traces until the rows take less than the byte bound again."""
        target = int(self.max_bytes * _EVICT_TO)
        evicted = 0
        while self._total > target or self._file_bytes(db) > target:
            cutoff = db.execute(
                "SELECT MAX(seq) FROM (SELECT seq FROM traces ORDER BY seq LIMIT ?)",
                (_EVICT_CHUNK,),
            ).fetchone()[0]
            if cutoff is None:
                break
            self._evict(db, cutoff)
            evicted += 1
        if evicted:
            log.info(
                "trace store: over %d MiB, evicted the oldest traces (%d MiB left)",
                self.max_bytes >> 20,
                self._total >> 20,
            )

    @staticmethod
    def _file_bytes(db: sqlite3.Connection) -> int:
        """Bytes of the database's pages in use (its free pages are reused before it grows)."""
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * size)

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
                "WHERE t.trace_id IN (SELECT trace_id FROM spans WHERE source = ?)"
                if plugin
                else ""
            )
            args: tuple[Any, ...] = (PLUGIN_PREFIX + plugin, limit) if plugin else (limit,)
            ids = [r[0] for r in db.execute(
                f"SELECT t.trace_id FROM traces t {where} ORDER BY t.seq DESC LIMIT ?", args
            )]  # fmt: skip
            return [self._summary(db, trace_id) for trace_id in ids]
        finally:
            db.close()

    def _summary(self, db: sqlite3.Connection, trace_id: str) -> mesh_pb2.TraceSummary:
        rows = db.execute(
            "SELECT span_id, parent_span_id, name, service, start_ns, end_ns, error, source "
            "FROM spans WHERE trace_id = ? ORDER BY start_ns",
            (trace_id,),
        ).fetchall()
        # The root, start and duration come from the orchestrator's and clients' spans when
        # the trace has any: a plugin cannot make its span the root, nor stretch the trace.
        trusted = [r for r in rows if r[7] in _TRUSTED] or rows
        ids = {r[0] for r in trusted}
        root = next((r for r in trusted if r[1] not in ids), trusted[0])
        start, end = min(r[4] for r in trusted), max(r[5] for r in trusted)
        summary = mesh_pb2.TraceSummary(
            trace_id=trace_id, root_name=root[2], root_service=root[3], root_source=root[7],
            span_count=len(rows), services=sorted({r[3] for r in rows}),
            error=any(r[6] for r in rows),
        )  # fmt: skip
        summary.start_time.FromNanoseconds(start)
        summary.duration.FromNanoseconds(max(0, end - start))
        return summary

    async def spans(self, trace_id: str) -> tuple[list[mesh_pb2.TraceSpan], int]:
        """The stored spans of the trace ``trace_id`` (or a unique prefix of 6+ digits).

        Also returns how many were left out to keep the answer within
        ``MAX_ANSWER_BYTES``: the orchestrator's spans come first, then the
        clients', then the plugins'.
        """
        return await asyncio.to_thread(self._get, trace_id.strip().lower())

    def _get(self, trace_id: str) -> tuple[list[mesh_pb2.TraceSpan], int]:
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
                "SELECT trace_id, span_id, parent_span_id, name, service, kind, start_ns, end_ns, "
                "error, status_message, attributes, source, size FROM spans WHERE trace_id = ? "
                "ORDER BY source != ?, source != ?, start_ns",
                (matches[0], ORCHESTRATOR, CLIENT),
            ).fetchall()
        finally:
            db.close()
        spans = []
        budget, omitted = MAX_ANSWER_BYTES, 0
        for row in rows:
            budget -= row[_SIZE]
            if budget < 0 and row[_SOURCE] != ORCHESTRATOR:
                omitted += 1
                continue
            span = mesh_pb2.TraceSpan(
                trace_id=row[0], span_id=row[1], parent_span_id=row[2], name=row[3],
                service=row[4], kind=row[5], error=bool(row[8]), status_message=row[9],
                attributes=json.loads(row[10]), source=row[11],
            )  # fmt: skip
            span.start_time.FromNanoseconds(row[6])
            span.duration.FromNanoseconds(max(0, row[7] - row[6]))
            spans.append(span)
        spans.sort(key=lambda s: s.start_time.ToNanoseconds())
        return spans, omitted


def _sizes(rows: list[Row]) -> dict[str, int]:
    """Bytes per source of ``rows``."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row[_SOURCE]] = sizes.get(row[_SOURCE], 0) + row[_SIZE]
    return sizes
