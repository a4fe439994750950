"""Trace store rows from OTLP spans anyone may have sent: validated, stamped and bounded.

A plugin's spans arrive on its callback socket, a client's on the mesh's
listeners; neither is trusted. Every span is checked (ids of the right length,
not zero), stamped with the source the orchestrator knows it came from (never
what the payload claims) and cut to size: names, keys, values, the number of
attributes and their nesting are bounded, and a span that lost anything says
so in ``sidemesh.truncated``. Times are clamped near the present, kinds to
those OTLP defines. Span events and links are not stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

#: The source of the orchestrator's own spans.
ORCHESTRATOR = "orchestrator"
#: The source of spans sent to the mesh's own listeners (the CLI's, a client's).
CLIENT = "client"
#: The prefix of a plugin's source: ``plugin:NAME``.
PLUGIN_PREFIX = "plugin:"

#: Bounds on what one span may put in the store (characters; bytes for the total).
MAX_NAME = 256
MAX_STATUS = 512
MAX_KEY = 128
MAX_VALUE = 1024
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTES_TEXT = 6 * 1024
#: Nesting of array and key-value list attribute values kept, and values visited per attribute.
MAX_DEPTH = 4
MAX_NODES = 256
#: Spans one export request may carry; the rest are refused.
MAX_SPANS_PER_EXPORT = 1024
#: A span may start at most this long before it arrives, and end at most this far ahead.
MAX_AGE_NS = 24 * 3600 * 10**9
MAX_AHEAD_NS = 60 * 10**9
#: What a row costs in the store beyond its text: ids, numbers, index entries, headers, its
#: trace's row (measured: 170 to 490 bytes a span), and a sixth of the text for pages that
#: are not full (measured: at most 16%), so that a plugin's quota bounds the file it fills.
ROW_OVERHEAD = 384
#: Attributes the orchestrator adds to spans it had to change.
TRUNCATED = "sidemesh.truncated"
CLAIMED_SERVICE = "sidemesh.claimed_service"

_MARKERS = (TRUNCATED, CLAIMED_SERVICE)
_ELLIPSIS = "…"
_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
_MAX_KIND = 5  # SPAN_KIND_CONSUMER
_INT64_MAX = 2**63 - 1

Row = tuple[Any, ...]
"""One span in the store: trace_id, span_id, parent_span_id, name, service, kind, start_ns,
end_ns, error, status_message, attributes (JSON), source, size (bytes it is charged)."""


def plugin_source(plugin: str) -> str:
    """The source of ``plugin``'s spans: ``plugin:NAME``."""
    return PLUGIN_PREFIX + plugin


def row_size(*texts: str) -> int:
    """The bytes a row with these text fields is charged (see ``ROW_OVERHEAD``)."""
    size = sum(len(t) if t.isascii() else len(t.encode()) for t in texts)
    return ROW_OVERHEAD + size * 7 // 6


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``…`` when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS


@dataclass
class Batch:
    """What became of one export request's spans."""

    #: A row per valid span, with its trace id (an int), the span, its resource's index,
    #: and whether anything of it was cut or clamped.
    rows: list[Row] = field(default_factory=list)
    trace_ids: list[int] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    resources: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    #: Spans refused as malformed (bad ids), or beyond ``MAX_SPANS_PER_EXPORT``.
    malformed: int = 0
    too_many: int = 0


def count_spans(request: ExportTraceServiceRequest) -> int:
    """How many spans ``request`` carries."""
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def spans_of(request: ExportTraceServiceRequest) -> Iterator[tuple[int, ResourceSpans, Span]]:
    """Every span of ``request`` with its resource (and the resource's index)."""
    for index, resource_spans in enumerate(request.resource_spans):
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield index, resource_spans, span


def claimed(resource_spans: ResourceSpans, key: str) -> str | None:
    """A resource attribute's text as the sender claims it (bounded), or None."""
    for kv in resource_spans.resource.attributes:
        if kv.key == key:
            return cut(_Walk().text(kv.value), MAX_VALUE)
    return None


def rows_of(
    request: ExportTraceServiceRequest,
    source: str,
    now_ns: int,
    service: str | None = None,
    reserved: Iterable[str] = (),
) -> Batch:
    """Rows for the spans of ``request``, which came from ``source``.

    ``service``: the service name to store (a plugin's name), whatever the
    resource claims; ``None`` keeps the claimed one, unless it is one of
    ``reserved`` (the orchestrator's or a plugin's), which gets `` (client)``.
    """
    batch = Batch()
    reserved = frozenset(reserved)
    services: dict[int, tuple[str, str | None]] = {}
    seen = 0
    for index, resource_spans, span in spans_of(request):
        seen += 1
        if seen > MAX_SPANS_PER_EXPORT:
            batch.too_many += 1
            continue
        trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
        if (
            len(trace_id) != 16
            or len(span_id) != 8
            or len(parent) not in (0, 8)
            or not any(trace_id)
            or not any(span_id)
        ):
            batch.malformed += 1
            continue
        if index not in services:
            claim = claimed(resource_spans, "service.name")
            if service is not None:
                services[index] = (service, claim if claim != service else None)
            else:
                name = cut(claim or "unknown_service", MAX_KEY)
                services[index] = (f"{name} (client)" if name in reserved else name, None)
        stored_service, claim = services[index]
        row, truncated = _row(span, stored_service, claim, source, now_ns)
        batch.rows.append(row)
        batch.trace_ids.append(int.from_bytes(trace_id, "big"))
        batch.spans.append(span)
        batch.resources.append(index)
        batch.truncated.append(truncated)
    return batch


def _row(span: Span, service: str, claim: str | None, source: str, now_ns: int) -> tuple[Row, bool]:
    cuts: list[str] = []
    name = span.name
    if len(name) > MAX_NAME:
        name = cut(name, MAX_NAME)
        cuts.append("name")
    message = span.status.message
    if len(message) > MAX_STATUS:
        message = cut(message, MAX_STATUS)
        cuts.append("status_message")
    attributes, attribute_cuts = _attributes(span.attributes)
    cuts += attribute_cuts
    for key in _MARKERS:  # only the orchestrator sets these
        attributes.pop(key, None)
    if claim is not None:
        attributes[CLAIMED_SERVICE] = claim
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    low, high = max(0, now_ns - MAX_AGE_NS), min(now_ns + MAX_AHEAD_NS, _INT64_MAX)
    clamped_start = min(max(start, low), high)
    clamped_end = min(max(end, clamped_start), high)
    if (clamped_start, clamped_end) != (start, end):
        cuts.append("time")
    kind = span.kind if 0 <= span.kind <= _MAX_KIND else 0
    if cuts:
        attributes[TRUNCATED] = ",".join(cuts)
    text = json.dumps(attributes, ensure_ascii=False)
    row = (
        span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), name, service, kind,
        clamped_start, clamped_end, int(span.status.code == _ERROR), message, text, source,
        row_size(name, service, message, text, source),
    )  # fmt: skip
    return row, bool(cuts)


def _attributes(kvs: Sequence[KeyValue]) -> tuple[dict[str, str], list[str]]:
    """The attributes as text, within the bounds; and what had to be cut."""
    out: dict[str, str] = {}
    cuts: set[str] = set()
    budget = MAX_ATTRIBUTES_TEXT
    for kv in kvs:
        if len(out) >= MAX_ATTRIBUTES or budget <= 0:
            break
        walk = _Walk()
        key, value = kv.key, walk.text(kv.value)
        if len(key) > MAX_KEY:
            key = cut(key, MAX_KEY)
            cuts.add("attribute keys")
        limit = min(MAX_VALUE, budget)
        if len(value) > limit:
            value = cut(value, limit)
            walk.cut = True
        if walk.cut:
            cuts.add("attribute values")
        out[key] = value
        budget -= len(key) + len(value)
    found = sorted(cuts)
    dropped = len(kvs) - len(out)  # beyond the bounds (or a key given twice)
    if dropped:
        found.append(f"{dropped} attributes dropped")
    return out, found


class _Walk:
    """Renders one attribute value as text, visiting at most ``MAX_NODES`` values of it."""

    __slots__ = ("cut", "nodes")

    def __init__(self) -> None:
        self.nodes = MAX_NODES
        #: Set when anything of the value was left out.
        self.cut = False

    def text(self, value: AnyValue) -> str:
        """The value as text: a string as is, anything else as JSON (both may be too long)."""
        plain = self._plain(value, 0)
        return plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)

    def _plain(self, value: AnyValue, depth: int) -> Any:
        self.nodes -= 1
        kind = value.WhichOneof("value")
        if kind == "string_value":  # one character over the limit: the caller sees it was long
            return value.string_value[: MAX_VALUE + 1]
        if kind == "bytes_value":
            return value.bytes_value[: MAX_VALUE // 2 + 1].hex()
        if kind == "array_value" or kind == "kvlist_value":
            if depth >= MAX_DEPTH:
                self.cut = True
                return _ELLIPSIS
            if kind == "array_value":
                items: list[Any] = []
                for item in value.array_value.values:
                    if self.nodes <= 0:
                        self.cut = True
                        items.append(_ELLIPSIS)
                        break
                    items.append(self._plain(item, depth + 1))
                return items
            pairs: dict[str, Any] = {}
            for kv in value.kvlist_value.values:
                if self.nodes <= 0:
                    self.cut = True
                    pairs[_ELLIPSIS] = _ELLIPSIS
                    break
                pairs[cut(kv.key, MAX_KEY)] = self._plain(kv.value, depth + 1)
            return pairs
        return getattr(value, kind) if kind else None
