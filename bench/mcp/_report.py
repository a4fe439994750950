"""The MCP benchmark's results: medians over rounds, ratios, and the Markdown table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

from bench.mcp._load import Measurement

PEERS = ("fastmcp-proxy", "mcp-proxy")
SIDEMESH = ("sidemesh-stdio", "sidemesh-http", "sidemesh-http-sse")
_FIELDS = ("calls_per_s", "p50_ms", "p99_ms", "gateway_cpu_ms_per_call",
           "endpoint_cpu_ms_per_call", "client_cpu_ms_per_call")  # fmt: skip


def summarize(
    results: list[Measurement], *, concurrency: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """Per topology the median of each number over the rounds, and the ratios."""
    by_name: dict[str, list[Measurement]] = {}
    for r in results:
        by_name.setdefault(r.topology, []).append(r)
    topologies: dict[str, dict[str, Any]] = {}
    for name, runs in by_name.items():
        row: dict[str, Any] = {
            "calls": sum(r.calls for r in runs),
            "errors": sum(r.errors for r in runs),
        }
        for field in _FIELDS:
            values = [getattr(r, field) for r in runs if getattr(r, field) is not None]
            row[field] = round(statistics.median(values), 3) if values else None
        topologies[name] = row
    direct = topologies.get("direct", {}).get("calls_per_s")
    peers = [topologies[p] for p in PEERS if p in topologies]
    best_rate = max((p["calls_per_s"] for p in peers), default=None)
    best_cpu = min((p["gateway_cpu_ms_per_call"] for p in peers), default=None)
    for row in topologies.values():
        row["vs_direct"] = round(row["calls_per_s"] / direct, 2) if direct else None
        row["vs_best_peer_rate"] = round(row["calls_per_s"] / best_rate, 2) if best_rate else None
        cpu = row["gateway_cpu_ms_per_call"]
        row["vs_best_peer_cpu"] = round(cpu / best_cpu, 2) if best_cpu and cpu else None
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "concurrency": concurrency,
        "seconds_per_slot": seconds,
        "rounds": rounds,
        "topologies": topologies,
        "runs": [r.to_json() for r in results],
    }


def _cell(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value:g}{suffix}"


def markdown(summary: dict[str, Any]) -> str:
    """The results as the table the README quotes."""
    lines = [
        "# MCP benchmark",
        "",
        f"`python -m bench.mcp`, {summary['when']}: {summary['concurrency']} calls in flight on "
        f"one MCP session, {summary['seconds_per_slot']:g} s per topology per round, median of "
        f"{summary['rounds']} rounds; one FastMCP echo server (stdio) behind every topology; "
        f"{summary['host']['cpus']} CPUs, Python {summary['host']['python']}.",
        "",
        "| topology | calls/s | p50 ms | p99 ms | gateway CPU ms/call | endpoint process CPU "
        "ms/call | calls/s vs direct | calls/s vs best peer | CPU vs best peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["topologies"].items():
        lines.append(
            f"| {name} | {_cell(row['calls_per_s'])} | {_cell(row['p50_ms'])} | "
            f"{_cell(row['p99_ms'])} | {_cell(row['gateway_cpu_ms_per_call'])} | "
            f"{_cell(row['endpoint_cpu_ms_per_call'])} | {_cell(row['vs_direct'], 'x')} | "
            f"{_cell(row['vs_best_peer_rate'], 'x')} | {_cell(row['vs_best_peer_cpu'], 'x')} |"
        )
    lines += [
        "",
        "Gateway CPU: every process between the client and the echo server (Sidemesh: "
        "`sidemesh mcp` for stdio, the orchestrator, the MCP bridge sidecar). Endpoint process: "
        "the process that speaks MCP to the client (`sidemesh mcp`; the orchestrator, which also "
        "forwards, for HTTP and gRPC). `sidemesh-grpc` is the reference without an MCP front.",
        "",
    ]
    return "\n".join(lines)
