"""``sidemesh plugins | agents | tools | events``: what the mesh offers and what happens in it."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from typing import Any

from clients import AsyncMeshClient
from orchestrator._plugin import state_name
from orchestrator.cli._common import (
    EXIT_OK,
    add_mesh_options,
    print_json,
    run_client,
    to_json,
)
from sidemesh.core import struct_to_dict
from sidemesh.v1 import mesh_pb2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers the inspection commands."""
    p = sub.add_parser("plugins", help="list plugins: state, replicas, restarts, sandbox, errors")
    p.add_argument("--verbose", "-v", action="store_true", help="show replicas and full errors")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _plugins(c, a)))

    p = sub.add_parser("agents", help="list agents")
    p.add_argument("--plugin", default="", help="only this plugin's agents")
    p.add_argument("--capability", default="", help="only agents declaring this capability")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _agents(c, a)))

    p = sub.add_parser("tools", help="list tools")
    p.add_argument("--plugin", default="", help="only this plugin's tools")
    p.add_argument("--query", "-q", default="", help="only tools mentioning this text")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _tools(c, a)))

    p = sub.add_parser("events", help="follow the mesh's events (Ctrl-C to stop)")
    p.add_argument("--plugin", default="", help="only events about this plugin")
    p.add_argument("--lifecycle", action="store_true", help="leave out call events")
    p.add_argument("--replay", type=int, default=0, help="first show up to N recent events")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _events(c, a)))


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned columns, like ``kubectl get``."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


def _replica_state(state: int) -> str:
    return mesh_pb2.ReplicaState.Name(state).removeprefix("REPLICA_STATE_")  # type: ignore[arg-type]


def sandbox_summary(plugin: mesh_pb2.PluginStatus) -> str:
    """The active sandbox layers, e.g. ``namespaces,seccomp,...``; ``none`` when unsandboxed."""
    active = [layer.name for layer in plugin.sandbox if layer.active]
    return ",".join(active) if active else "none"


async def _plugins(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    plugins = await client.list_plugins()
    if args.output == "json":
        print_json([to_json(p) for p in plugins])
        return EXIT_OK
    rows = []
    for p in plugins:
        ready = sum(r.state == mesh_pb2.REPLICA_STATE_READY for r in p.replicas)
        error = p.error.splitlines()[0] if p.error else ""
        rows.append([p.name, state_name(p.state), f"{ready}/{len(p.replicas)}", str(p.restarts),
                     p.version or "-", sandbox_summary(p), error[:70]])  # fmt: skip
    print(table(rows, ["NAME", "STATE", "READY", "RESTARTS", "VERSION", "SANDBOX", "ERROR"]))
    if args.verbose:
        for p in plugins:
            print(f"\n{p.name} ({p.directory})")
            for r in p.replicas:
                started = f", up since {_time(r.started_at.ToNanoseconds())}" if r.pid else ""
                ejected = ""
                if r.HasField("ejected_until"):
                    until = _time(r.ejected_until.ToNanoseconds())
                    ejected = f", EJECTED until {until} ({r.ejection_reason})"
                elif r.ejections:
                    ejected = f", ejected {r.ejections}x recently"
                if r.output_lines_dropped:
                    ejected += f", {r.output_lines_dropped} output lines dropped (rate limit)"
                print(f"  replica {r.index}: {_replica_state(r.state)}, pid {r.pid or '-'}, "
                      f"{r.restarts} restarts, {r.rss_bytes // 1024} KiB RSS{started}{ejected}"
                      + (f", last exit: {r.last_exit}" if r.last_exit else ""))  # fmt: skip
            for layer in p.sandbox:
                print(f"  sandbox {layer.name}: {'on' if layer.active else 'OFF'} {layer.detail}")
            if p.HasField("host_uid"):
                print(f"  runs as host uid {p.host_uid} (the same every run)")
            for path in p.paths:
                print(f"  {sandbox_path(path)}")
            if p.HasField("data_dir"):
                print(f"  {data_dir_summary(p.data_dir)}")
            if p.HasField("trace_usage"):
                print("  " + trace_usage(p.trace_usage))
            if p.error:
                print("  error:\n    " + p.error.replace("\n", "\n    "))
    return EXIT_OK


def trace_usage(usage: mesh_pb2.TraceUsage) -> str:
    """``traces: 1.2 of 16 MiB quota, 340 spans stored, 12 refused (...)``."""
    mib = 1024 * 1024
    line = (
        f"traces: {usage.bytes_used / mib:.1f} of {usage.bytes_quota / mib:g} MiB quota, "
        f"{usage.spans_accepted} spans stored, {usage.spans_refused} refused"
    )
    if usage.spans_refused:
        line += (
            f" ({usage.refused_over_quota} over quota, {usage.refused_unknown_trace} for "
            f"traces not its own, {usage.refused_malformed} malformed)"
        )
    if usage.spans_truncated:
        line += f", {usage.spans_truncated} truncated"
    if usage.exports_throttled:
        line += f", {usage.exports_throttled} exports throttled"
    if usage.last_refusal:
        line += f"\n    last refusal: {usage.last_refusal}"
    return line


def sandbox_path(path: mesh_pb2.SandboxPath) -> str:
    """``mount repo: /home/me/project -> /mnt/repo (ro)``, and what is wrong with it."""
    kind = {
        mesh_pb2.SANDBOX_PATH_KIND_PLUGIN_DIR: "plugin dir",
        mesh_pb2.SANDBOX_PATH_KIND_DATA_DIR: "data dir",
        mesh_pb2.SANDBOX_PATH_KIND_MANIFEST: "manifest path",
        mesh_pb2.SANDBOX_PATH_KIND_MOUNT: f"mount {path.name}",
    }.get(path.kind, "path")
    where = path.host_path
    if path.sandbox_path and path.sandbox_path != path.host_path:
        where += f" -> {path.sandbox_path}"
    line = f"path {kind}: {where} ({'rw' if path.writable else 'ro'})"
    return f"{line}: {path.problem}" if path.problem else line


def data_dir_summary(data: mesh_pb2.DataDirStatus) -> str:
    """``data dir: 3.2 of 16 MiB, 5 of 2048 files (ext4 image)``, and what is wrong."""
    how = {
        mesh_pb2.DATA_QUOTA_MECHANISM_IMAGE: "ext4 image",
        mesh_pb2.DATA_QUOTA_MECHANISM_ACCOUNTED: "accounted",
    }.get(data.mechanism, "?")
    line = (
        f"data dir: {data.used_bytes / (1 << 20):.1f} of {data.quota_bytes >> 20} MiB, "
        f"{data.files} of {data.max_files} files ({how})"
    )
    if data.read_only:
        line += ", READ-ONLY"
    if data.problem:
        line += f": {data.problem}"
    return line


async def _agents(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    agents = await client.list_agents(plugin=args.plugin, capability=args.capability)
    if args.output == "json":
        print_json([to_json(a) for a in agents])
        return EXIT_OK
    rows = [[a.qualified_name, ",".join(a.capabilities), a.description.split("\n")[0][:60]]
            for a in agents]  # fmt: skip
    print(table(rows, ["AGENT", "CAPABILITIES", "DESCRIPTION"]))
    return EXIT_OK


async def _tools(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    tools = await client.list_tools(plugin=args.plugin, query=args.query)
    if args.output == "json":
        print_json([to_json(t) for t in tools])
        return EXIT_OK
    rows = [[t.qualified_name, _params(t.input_schema), t.description.split("\n")[0][:60]]
            for t in tools]  # fmt: skip
    print(table(rows, ["TOOL", "ARGUMENTS", "DESCRIPTION"]))
    return EXIT_OK


def _params(struct: Any) -> str:
    """``a: integer, b?: string`` from an input schema (``?``: optional)."""
    schema = struct_to_dict(struct)
    props: dict[str, Any] = schema.get("properties") or {}
    required: list[str] = [r for r in schema.get("required") or () if r in props]
    names = required + sorted(set(props) - set(required))  # required first, as declared
    out = [
        f"{name}{'' if name in required else '?'}: {props[name].get('type', 'any')}"
        for name in names
    ]
    return ", ".join(out) or "-"


async def _events(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    events = client.watch_events(
        plugin=args.plugin, lifecycle_only=args.lifecycle, replay=args.replay
    )
    async for event in events:
        if args.output == "json":
            print_json(to_json(event), line=True)
        else:
            print(format_event(event), flush=True)
    print("sidemesh: the mesh ended the event stream (it is shutting down)", file=sys.stderr)
    return EXIT_OK


def format_event(event: mesh_pb2.WatchEventsResponse) -> str:
    """One line per event: time, plugin, kind, and its fields."""
    kind = event.WhichOneof("event") or "?"
    fields = to_json(getattr(event, kind))
    if kind == "plugin_state_changed":
        change = event.plugin_state_changed
        detail = f"{state_name(change.previous)} -> {state_name(change.state)}"
        if fields.get("reason"):
            detail += f" ({fields['reason']})"
    else:
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"{_time(event.time.ToNanoseconds())} {event.plugin:<14} {kind:<21} {detail}"


def _time(nanos: int) -> str:
    return datetime.datetime.fromtimestamp(nanos / 1e9).strftime("%H:%M:%S.%f")[:-3]
