"""Who may add which spans to the trace store: sources, their quotas and the traces they know.

Every span the store holds has a source the orchestrator set: ``orchestrator``
(its own), ``plugin:NAME`` (sent on plugin NAME's callback socket) or
``client`` (sent to the mesh's listeners). A plugin's spans are accepted only
for traces it took part in (:class:`KnownTraces`: calls the router routed to
it, and its own callbacks), and only while its spans take less than its byte
quota in the store. What is refused is counted, and reported at a bounded rate
(:meth:`TraceSource.report`).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from orchestrator._span_rows import (
    CLIENT,
    ROW_OVERHEAD,
    Batch,
    Row,
    claimed,
    count_spans,
    plugin_source,
    rows_of,
)
from orchestrator._trace_store import TraceStore
from sidemesh.v1 import mesh_pb2

#: Trace ids kept per plugin: the most recent ones routed to it or started by it.
KNOWN_TRACES = 8192
#: Seconds between two reports of refused spans of one source (the first is at once).
REPORT_INTERVAL = 10.0
#: Bytes of export requests one source may send per second, and at once.
EXPORT_BYTES_PER_SECOND = 8 << 20
EXPORT_BURST = 32 << 20
_MIB = 1024 * 1024
_REASONS = ("over_quota", "unknown_trace", "malformed")


class KnownTraces:
    """The most recent trace ids one plugin took part in (an LRU set of ``size`` ids)."""

    __slots__ = ("_ids", "_size")

    def __init__(self, size: int = KNOWN_TRACES) -> None:
        self._ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._size = size

    def __contains__(self, trace_id: object) -> bool:
        return trace_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, trace_id: int) -> None:
        """Adds ``trace_id`` (or makes it the most recent); forgets the oldest beyond the size."""
        ids = self._ids
        if trace_id in ids:
            ids.move_to_end(trace_id)
            return
        ids[trace_id] = None
        if len(ids) > self._size:
            ids.popitem(last=False)


@dataclass
class Outcome:
    """What became of one export request."""

    accepted: int = 0
    over_quota: int = 0
    unknown_trace: int = 0
    malformed: int = 0
    truncated: int = 0
    #: The replica the sender claims to be (validated), for the report.
    replica: int = 0

    @property
    def refused(self) -> int:
        """Spans refused, for every reason."""
        return self.over_quota + self.unknown_trace + self.malformed


class TraceSource:
    """One sender of spans (a plugin, or the clients) and what it may put in the store."""

    def __init__(
        self,
        store: TraceStore,
        source: str,
        *,
        plugin: str = "",
        quota_bytes: int,
        replicas: int = 1,
        known: KnownTraces | None = None,
    ) -> None:
        self.store = store
        #: ``plugin:NAME`` or ``client``.
        self.source = source
        #: The plugin's name: its spans' ``service.name``; empty for clients.
        self.plugin = plugin
        self.quota_bytes = quota_bytes
        self.replicas = max(1, replicas)
        #: The traces the plugin may add spans to; None: any (clients start their own).
        self.known = known
        self.accepted = 0
        self.refused_over_quota = 0
        self.refused_unknown_trace = 0
        self.refused_malformed = 0
        self.truncated = 0
        self.last_refusal = ""
        #: Export requests being processed now, and those refused for coming too fast (the
        #: receiver bounds both, on the event loop).
        self.in_flight = 0
        self.throttled = 0
        #: A report of refusals held back is scheduled (on the event loop).
        self.report_scheduled = False
        self._tokens = float(EXPORT_BURST)
        self._filled_at = time.monotonic()
        self._stats = threading.Lock()
        self._unreported = Outcome()
        #: When each reason of refusal was last reported.
        self._reported_at: dict[str, float] = {}

    def throttle(self, size: int, now: float | None = None) -> float:
        """Seconds to wait before sending ``size`` more bytes of exports; 0: go ahead.

        A token bucket of ``EXPORT_BYTES_PER_SECOND``, bursting to
        ``EXPORT_BURST``: decoding costs the orchestrator CPU whatever becomes
        of the spans, so a sender gets that much of it and no more.
        """
        now = time.monotonic() if now is None else now
        self._tokens = min(
            float(EXPORT_BURST), self._tokens + (now - self._filled_at) * EXPORT_BYTES_PER_SECOND
        )
        self._filled_at = now
        if self._tokens < 0:
            self.throttled += 1
            return -self._tokens / EXPORT_BYTES_PER_SECOND
        self._tokens -= size  # may go below zero: a request larger than the burst still passes
        return 0.0

    # -- admission (in a worker thread) -----------------------------------------

    def admit(
        self,
        request: ExportTraceServiceRequest,
        now_ns: int,
        is_known: Callable[[KnownTraces, int], bool],
        reserved: frozenset[str] = frozenset(),
    ) -> tuple[Outcome, Batch, list[int]]:
        """Checks and stores the spans of ``request``; the outcome, the rows, those stored."""
        outcome = Outcome(replica=self._replica(request))
        if self.store.used(self.source) + ROW_OVERHEAD > self.quota_bytes:
            # Over quota already: refused without looking further.
            outcome.over_quota = count_spans(request)
            self.count(outcome)
            return outcome, Batch(), []
        batch = rows_of(
            request,
            self.source,
            now_ns,
            service=self.plugin or None,
            reserved=reserved,
        )
        outcome.malformed = batch.malformed + batch.too_many
        stored: list[int] = []
        decided: dict[int, bool] = {}
        rows: list[Row] = []
        for index, (row, trace_id) in enumerate(zip(batch.rows, batch.trace_ids, strict=True)):
            if self.known is not None:
                known = decided.get(trace_id)
                if known is None:
                    known = decided[trace_id] = is_known(self.known, trace_id)
                if not known:
                    outcome.unknown_trace += 1
                    continue
            if not self.store.charge(self.source, row[-1], self.quota_bytes):
                outcome.over_quota += 1
                continue
            rows.append(row)
            stored.append(index)
        outcome.accepted = len(rows)
        outcome.truncated = sum(1 for i in stored if batch.truncated[i])
        if rows:
            self.store.add(rows)
        self.count(outcome)
        return outcome, batch, stored

    def _replica(self, request: ExportTraceServiceRequest) -> int:
        """The replica the first resource claims (``sidemesh.replica``), when it is one; else 0."""
        if not request.resource_spans:
            return 0
        text = claimed(request.resource_spans[0], "sidemesh.replica") or ""
        if text.isdecimal() and len(text) <= 4 and int(text) < self.replicas:
            return int(text)
        return 0

    def count(self, outcome: Outcome) -> None:
        """Adds an outcome to the totals and to what is yet to be reported."""
        with self._stats:
            self.accepted += outcome.accepted
            self.refused_over_quota += outcome.over_quota
            self.refused_unknown_trace += outcome.unknown_trace
            self.refused_malformed += outcome.malformed
            self.truncated += outcome.truncated
            if outcome.refused:
                self.last_refusal = self.describe(outcome)
            unreported = self._unreported
            unreported.over_quota += outcome.over_quota
            unreported.unknown_trace += outcome.unknown_trace
            unreported.malformed += outcome.malformed

    # -- reporting (on the event loop) ------------------------------------------

    def report(self, now: float | None = None) -> tuple[str, float | None]:
        """The refusals to report now (a sentence, "" if none), and when to look again.

        Each reason (over quota, not its trace, malformed) is reported at once
        the first time, then at most every ``REPORT_INTERVAL`` seconds, summed;
        the second value is how many seconds until refusals held back become
        due (None: none are). The totals are always in :meth:`usage`.
        """
        now = time.monotonic() if now is None else now
        due, later = Outcome(), None
        with self._stats:
            pending = self._unreported
            for reason in _REASONS:
                count = getattr(pending, reason)
                if not count:
                    continue
                wait = self._reported_at.get(reason, -REPORT_INTERVAL) + REPORT_INTERVAL - now
                if wait <= 0:
                    setattr(due, reason, count)
                    setattr(pending, reason, 0)
                    self._reported_at[reason] = now
                else:
                    later = wait if later is None else min(later, wait)
        return (self.describe(due) if due.refused else ""), later

    def describe(self, outcome: Outcome) -> str:
        """A sentence saying what was refused and why, for logs, events and ``plugins -v``."""
        who = f"plugin {self.plugin!r}" if self.plugin else "clients"
        reasons = []
        if outcome.over_quota:
            used = self.store.used(self.source) / _MIB
            reasons.append(
                f"{outcome.over_quota} over {'its' if self.plugin else 'their'} trace quota "
                f"({used:.1f} of {self.quota_bytes / _MIB:g} MiB used)"
            )
        if outcome.unknown_trace:
            reasons.append(
                f"{outcome.unknown_trace} for traces never routed to it nor started by it"
            )
        if outcome.malformed:
            reasons.append(
                f"{outcome.malformed} malformed (bad trace or span ids) or beyond the span "
                "limit of one export"
            )
        return f"trace store: spans from {who} refused: " + "; ".join(reasons)

    def usage(self) -> mesh_pb2.TraceUsage:
        """What the source has in the store and what was refused, for ``PluginStatus``."""
        with self._stats:
            refused = self.refused_over_quota + self.refused_unknown_trace + self.refused_malformed
            return mesh_pb2.TraceUsage(
                bytes_used=self.store.used(self.source),
                bytes_quota=self.quota_bytes,
                spans_accepted=self.accepted,
                spans_refused=refused,
                refused_over_quota=self.refused_over_quota,
                refused_unknown_trace=self.refused_unknown_trace,
                refused_malformed=self.refused_malformed,
                spans_truncated=self.truncated,
                last_refusal=self.last_refusal,
                exports_throttled=self.throttled,
            )


class TraceSources:
    """Every source of the mesh, and the traces each plugin took part in.

    :meth:`routed` is the router's hook: it is called for every routed call,
    on the event loop; admission checks run in worker threads. One lock keeps
    the sets consistent.
    """

    def __init__(
        self, store: TraceStore, client_quota_bytes: int, orchestrator_service: str = ""
    ) -> None:
        self.store = store
        self.plugins: dict[str, TraceSource] = {}
        self.client = TraceSource(store, CLIENT, quota_bytes=client_quota_bytes)
        self._lock = threading.Lock()
        #: Service names a client's spans may not take: the orchestrator's and the plugins'.
        self.reserved: frozenset[str] = frozenset({orchestrator_service} - {""})

    def add_plugin(self, plugin: str, quota_bytes: int, replicas: int) -> TraceSource:
        """Registers a plugin with a callback socket; returns its source."""
        source = TraceSource(
            self.store,
            plugin_source(plugin),
            plugin=plugin,
            quota_bytes=quota_bytes,
            replicas=replicas,
            known=KnownTraces(),
        )
        self.plugins[plugin] = source
        self.reserved = self.reserved | {plugin}
        return source

    def knows(self, known: KnownTraces, trace_id: int) -> bool:
        """Whether ``trace_id`` is in ``known`` (for admission, from any thread)."""
        with self._lock:
            return trace_id in known

    def routed(self, plugin: str, trace_id: int, caller: str = "") -> None:
        """Notes that a call of trace ``trace_id`` was routed to ``plugin`` (from ``caller``).

        The plugin may then add spans to the trace. So may the caller, if the
        trace is its own: one it took part in, or a new one it started; a
        trace that other plugins take part in but the caller did not is not
        made the caller's by its calling back with that trace's id.
        """
        with self._lock:
            if caller:
                source = self.plugins.get(caller)
                if source is not None and source.known is not None:
                    known = source.known
                    if trace_id in known or not any(
                        trace_id in other.known
                        for other in self.plugins.values()
                        if other is not source and other.known is not None
                    ):
                        known.add(trace_id)
            target = self.plugins.get(plugin)
            if target is not None and target.known is not None:
                target.known.add(trace_id)
