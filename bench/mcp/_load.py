"""The MCP benchmark's load: ``concurrency`` workers calling ``echo`` through one MCP session.

The client is the official MCP SDK's (``mcp.Client``, the 2025-11-25
handshake, which every peer speaks), in this process; the gRPC variant uses
``clients.AsyncMeshClient``. Every loop is bounded by ``duration`` and by
``max_calls``. CPU comes from ``/proc``: the gateway's processes (not the
echo server, not the client), the endpoint's own process, and the client.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mcp import Client

from bench._proc import cpu_seconds
from bench.mcp._topologies import Topology
from clients import AsyncMeshClient

#: The text each call echoes.
PAYLOAD = {"text": "hello, mesh"}


@dataclass
class Measurement:
    """One topology's numbers in one round."""

    topology: str
    calls: int
    errors: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    gateway_cpu_ms_per_call: float
    endpoint_cpu_ms_per_call: float | None
    client_cpu_ms_per_call: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _children() -> list[int]:
    pids: list[int] = []
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            pids += [int(p) for p in children.read_text().split()]
        except OSError:
            continue
    return pids


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _drive(
    call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float, max_calls: int
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < end and len(latencies) + errors < max_calls:
            t0 = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def measure(
    topology: Topology, *, concurrency: int, seconds: float, warmup: float, max_calls: int
) -> Measurement:
    """Connects to ``topology``, warms up, then measures ``seconds`` of calls."""
    before = set(_children())
    if topology.transport == "grpc":
        async with AsyncMeshClient(topology.url, timeout=30) as mesh:

            async def grpc_call() -> Any:
                return await mesh.call_tool(topology.tool, PAYLOAD)

            return await _measure(topology, grpc_call, [], concurrency, seconds, warmup, max_calls)
    target: Any = topology.server if topology.transport == "stdio" else topology.url
    async with Client(target, mode="legacy", cache=None) as client:
        spawned = [p for p in _children() if p not in before]

        async def mcp_call() -> Any:
            result = await client.call_tool(topology.tool, PAYLOAD)
            if result.is_error:
                raise RuntimeError(str(result.content))
            return result

        return await _measure(topology, mcp_call, spawned, concurrency, seconds, warmup, max_calls)


async def _measure(
    topology: Topology,
    call: Callable[[], Awaitable[Any]],
    spawned: list[int],
    concurrency: int,
    seconds: float,
    warmup: float,
    max_calls: int,
) -> Measurement:
    await call()  # the session works (and lists nothing it does not need)
    await _drive(call, concurrency, warmup, max_calls)
    gateway = topology.gateway_pids(spawned)
    endpoint = topology.endpoint_pid
    cpu0, end0, own0 = cpu_seconds(gateway), _endpoint_cpu(endpoint), _own_cpu()
    t0 = time.monotonic()
    latencies, errors = await _drive(call, concurrency, seconds, max_calls)
    elapsed = time.monotonic() - t0
    cpu1, end1, own1 = cpu_seconds(gateway), _endpoint_cpu(endpoint), _own_cpu()
    calls = len(latencies)
    per_call = 1000 / max(calls, 1)
    ordered = sorted(latencies)
    return Measurement(
        topology=topology.name,
        calls=calls,
        errors=errors,
        seconds=round(elapsed, 3),
        calls_per_s=round(calls / elapsed, 1) if elapsed else 0.0,
        p50_ms=round(statistics.median(ordered) * 1000, 2) if ordered else 0.0,
        p99_ms=round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2) if ordered else 0.0,
        gateway_cpu_ms_per_call=round((cpu1 - cpu0) * per_call, 3),
        endpoint_cpu_ms_per_call=(
            round((end1 - end0) * per_call, 3) if endpoint is not None else None
        ),
        client_cpu_ms_per_call=round((own1 - own0) * per_call, 3),
    )


def _endpoint_cpu(pid: int | None) -> float:
    return cpu_seconds([pid]) if pid is not None else 0.0
