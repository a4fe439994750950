"""``sidemesh traces`` and ``sidemesh trace ID``: recent traces, and one as a waterfall."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence

from clients import AsyncMeshClient
from orchestrator.cli._common import EXIT_OK, add_mesh_options, print_json, run_client, to_json
from orchestrator.cli._inspect import table
from sidemesh.v1 import mesh_pb2

_BAR = 32
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
         str(t.span_count), "error" if t.error else "ok", _short(t.root_name),
         ",".join(t.services)]
        for t in traces
    ]  # fmt: skip
    print(table(rows, ["TRACE", "START", "DURATION", "SPANS", "STATUS", "ROOT", "SERVICES"]))
    return EXIT_OK


async def _trace(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    spans = await client.get_trace(args.trace_id)
    if args.output == "json":
        print_json([to_json(s) for s in spans])
        return EXIT_OK
    print(waterfall(spans))
    return EXIT_OK


def waterfall(spans: Sequence[mesh_pb2.TraceSpan]) -> str:
    """The trace as an indented tree with a time bar per span."""
    if not spans:
        return "(no spans)"
    start = min(s.start_time.ToNanoseconds() for s in spans)
    end = max(s.start_time.ToNanoseconds() + s.duration.ToNanoseconds() for s in spans)
    total = max(end - start, 1)
    ids = {s.span_id for s in spans}
    children: dict[str, list[mesh_pb2.TraceSpan]] = {}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in ids else ""
        children.setdefault(parent, []).append(span)
    rows: list[list[str]] = []

    def walk(span: mesh_pb2.TraceSpan, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└─ " if last else "├─ ")
        offset = span.start_time.ToNanoseconds() - start
        length = span.duration.ToNanoseconds()
        left = int(offset / total * _BAR)
        width = max(1, round(length / total * _BAR))
        bar = " " * left + "█" * min(width, _BAR - left)
        label = f"{_short(span.name)} ({_KINDS.get(span.kind, 'span')})"
        target = span.attributes.get("sidemesh.target") or span.attributes.get("sidemesh.plugin")
        if target and span.kind == mesh_pb2.SPAN_KIND_CLIENT:
            label += f" -> {target}"
        status = "ERROR " + span.status_message if span.error else "ok"
        rows.append([prefix + branch + label, span.service, f"+{_ms(offset)}", _ms(length),
                     f"|{bar:<{_BAR}}|", status])  # fmt: skip
        kids = sorted(children.get(span.span_id, []), key=lambda s: s.start_time.ToNanoseconds())
        inner = prefix + ("" if depth == 0 else ("   " if last else "│  "))
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, depth + 1)

    roots = sorted(children.get("", []), key=lambda s: s.start_time.ToNanoseconds())
    for root in roots:
        walk(root, "", True, 0)
    services = sorted({s.service for s in spans})
    head = (f"trace {spans[0].trace_id}: {len(spans)} spans in {len(services)} processes "
            f"({', '.join(services)}), {_ms(total)}")  # fmt: skip
    return head + "\n" + table(rows, ["SPAN", "SERVICE", "START", "DURATION", "TIMELINE", "STATUS"])


def _short(name: str) -> str:
    return name.removeprefix("sidemesh.v1.")


def _ms(nanos: int) -> str:
    return f"{nanos / 1e6:.1f} ms"


def _clock(nanos: int) -> str:
    return datetime.datetime.fromtimestamp(nanos / 1e9).strftime("%H:%M:%S")
