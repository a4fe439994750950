"""``sidemesh traces`` and ``sidemesh trace ID``: recent traces, and one as a waterfall."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence

from clients import AsyncMeshClient
from orchestrator.cli._common import (
    EXIT_OK,
    add_mesh_options,
    print_json,
    printable,
    run_client,
    to_json,
)
from orchestrator.cli._inspect import table
from sidemesh.v1 import mesh_pb2

_BAR = 32
#: Deeper spans are drawn at this depth (a hostile trace may nest thousands deep).
_MAX_DEPTH = 24
ORCHESTRATOR = "orchestrator"
#: Sources whose spans set the time scale: a plugin's cannot stretch it.
_TRUSTED = frozenset({ORCHESTRATOR, "client"})
_KINDS = {
    mesh_pb2.SPAN_KIND_SERVER: "server",
    mesh_pb2.SPAN_KIND_CLIENT: "client",
    mesh_pb2.SPAN_KIND_INTERNAL: "internal",
}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``traces`` and ``trace``."""
    p = sub.add_parser("traces", help="list recent traces kept by the mesh")
    p.add_argument("--plugin", default="", help="only traces that reached this plugin")
    p.add_argument("--limit", "-n", type=int, default=20, help="how many (default 20)")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _traces(c, a)))

    p = sub.add_parser("trace", help="show one trace as a waterfall of its spans")
    p.add_argument("trace_id", metavar="ID", help="trace id, or a unique prefix of 6+ digits")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _trace(c, a)))


async def _traces(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    traces = await client.list_traces(limit=args.limit, plugin=args.plugin)
    if args.output == "json":
        print_json([to_json(t) for t in traces])
        return EXIT_OK
    rows = [
        [t.trace_id, _clock(t.start_time.ToNanoseconds()), _ms(t.duration.ToNanoseconds()),
         str(t.span_count), "error" if t.error else "ok", printable(_short(t.root_name)[:60]),
         printable(t.root_source), printable(",".join(t.services))]
        for t in traces
    ]  # fmt: skip
    header = ["TRACE", "START", "DURATION", "SPANS", "STATUS", "ROOT", "ROOT SOURCE", "SERVICES"]
    print(table(rows, header))
    return EXIT_OK


async def _trace(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    spans = await client.get_trace(args.trace_id)
    if args.output == "json":
        print_json([to_json(s) for s in spans])
        return EXIT_OK
    print(waterfall(spans))
    return EXIT_OK


def waterfall(spans: Sequence[mesh_pb2.TraceSpan]) -> str:
    """The trace as an indented tree with a time bar per span, and who sent each span.

    A plugin's spans are never taken for the orchestrator's: each row names its
    source; a span id used by more than one source resolves, as a parent, to
    the orchestrator's span first, else to the child's own source; and the time
    scale comes from the orchestrator's and clients' spans when there are any.
    Text from spans is printed with control characters escaped.
    """
    if not spans:
        return "(no spans)"
    trusted = [s for s in spans if s.source in _TRUSTED] or list(spans)
    start = min(s.start_time.ToNanoseconds() for s in trusted)
    end = max(s.start_time.ToNanoseconds() + s.duration.ToNanoseconds() for s in trusted)
    total = max(end - start, 1)
    by_id: dict[str, dict[str, int]] = {}
    for index, span in enumerate(spans):
        by_id.setdefault(span.span_id, {}).setdefault(span.source, index)
    children: dict[int, list[int]] = {}
    for index, span in enumerate(spans):
        candidates = by_id.get(span.parent_span_id, {})
        parent = candidates.get(ORCHESTRATOR, candidates.get(span.source))
        if parent is None and candidates:
            parent = next(iter(candidates.values()))
        children.setdefault(-1 if parent is None else parent, []).append(index)
    rows: list[list[str]] = []
    seen: set[int] = set()

    def by_start(indexes: list[int]) -> list[int]:
        return sorted(indexes, key=lambda i: spans[i].start_time.ToNanoseconds())

    def walk(root: int, note: str) -> None:
        stack = [(root, "", True, 0, note)]
        while stack:
            index, prefix, last, depth, mark = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            span = spans[index]
            rows.append(_row(span, prefix, last, depth, mark, start, total, by_id))
            inner = prefix + ("" if depth == 0 else ("   " if last else "│  "))
            if depth >= _MAX_DEPTH:
                inner = prefix
            kids = by_start(children.get(index, []))
            for i, kid in reversed(list(enumerate(kids))):
                stack.append((kid, inner, i == len(kids) - 1, depth + 1, ""))

    for root in by_start(children.get(-1, [])):
        walk(root, "")
    for index in by_start([i for i in range(len(spans)) if i not in seen]):
        walk(index, " [its parent is its own descendant]")
    services = sorted({printable(s.service) for s in spans})
    head = (f"trace {spans[0].trace_id}: {len(spans)} spans in {len(services)} processes "
            f"({', '.join(services)}), {_ms(total)}")  # fmt: skip
    header = ["SPAN", "SOURCE", "SERVICE", "START", "DURATION", "TIMELINE", "STATUS"]
    return head + "\n" + table(rows, header)


def _row(
    span: mesh_pb2.TraceSpan,
    prefix: str,
    last: bool,
    depth: int,
    mark: str,
    start: int,
    total: int,
    by_id: dict[str, dict[str, int]],
) -> list[str]:
    """One waterfall line."""
    branch = "" if depth == 0 else ("└─ " if last else "├─ ")
    offset = span.start_time.ToNanoseconds() - start
    length = span.duration.ToNanoseconds()
    left = min(max(int(offset / total * _BAR), 0), _BAR - 1)
    width = max(1, round(length / total * _BAR))
    bar = " " * left + "█" * min(width, _BAR - left)
    label = f"{_short(span.name)} ({_KINDS.get(span.kind, 'span')})"
    target = span.attributes.get("sidemesh.target") or span.attributes.get("sidemesh.plugin")
    if target and span.kind == mesh_pb2.SPAN_KIND_CLIENT:
        label += f" -> {target}"
    if span.source != ORCHESTRATOR and len(by_id.get(span.span_id, ())) > 1:
        label += " [reuses another source's span id]"
    status = "ERROR " + span.status_message if span.error else "ok"
    return [
        printable(prefix + branch + label + mark), printable(span.source or "?"),
        printable(span.service), f"+{_ms(offset)}", _ms(length), f"|{bar:<{_BAR}}|",
        printable(status),
    ]  # fmt: skip


def _short(name: str) -> str:
    return name.removeprefix("sidemesh.v1.")


def _ms(nanos: int) -> str:
    return f"{nanos / 1e6:.1f} ms"


def _clock(nanos: int) -> str:
    return datetime.datetime.fromtimestamp(nanos / 1e9).strftime("%H:%M:%S")
