"""One round of measurements on one topology: latency, unary throughput, agent streams.

Each phase also reads, from ``/proc``, the CPU time the forwarding process
(the orchestrator, or nginx's master and worker) and the sidecar used during
the measured window, and the host's CPU steal over it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._h2load import run_h2load
from bench._lab import Topology
from bench._proc import CpuMeter, HostCpu, own_cpu_seconds
from bench._profile import STREAM_SHAPES, Profile
from bench._streams import stream_throughput
from bench._unary import Latency, unary_latency, unary_throughput, verify_body


@dataclass(frozen=True)
class Tools:
    """External load generators and the request body h2load sends."""

    h2load: str | None
    body_file: Path


class Window:
    """CPU of the topology's processes and host steal over one measured window."""

    def __init__(self, topology: Topology) -> None:
        self.meter = CpuMeter({"proxy": topology.proxy_pids(), "sidecar": topology.sidecar_pids()})
        self.host: HostCpu | None = None
        self.own = 0.0

    def start(self) -> None:
        """Opens the window."""
        self.meter.start()
        self.host = HostCpu.read()
        self.own = own_cpu_seconds()

    def stop(self, units: int) -> dict[str, Any]:
        """Closes the window; CPU microseconds per unit (call or message), steal, and the
        share of the host's CPU that processes outside the topology used meanwhile."""
        cpu = self.meter.stop()
        host = HostCpu.read().since(self.host) if self.host else {}
        # This process is the client; h2load, its child, has been reaped by now.
        mine = cpu["proxy"] + cpu["sidecar"] + own_cpu_seconds() - self.own
        capacity = host.get("wall_seconds", 0.0) * (os.cpu_count() or 1)
        foreign = max(host.get("used_cpu_seconds", 0.0) - mine, 0.0)
        per = max(units, 1)
        return {
            "foreign_share": foreign / capacity if capacity > 0 else None,
            "proxy_cpu_us_per_unit": cpu["proxy"] / per * 1e6 if self.meter.pids["proxy"] else None,
            "sidecar_cpu_us_per_unit": cpu["sidecar"] / per * 1e6,
            "proxy_cpu_seconds": cpu["proxy"],
            "sidecar_cpu_seconds": cpu["sidecar"],
            "steal": host.get("steal"),
            "host_busy": host.get("busy"),
        }


def measure_latency(topology: Topology, profile: Profile) -> dict[str, Any]:
    """p50/p99 of sequential unary calls with the generated stubs."""
    result: Latency = asyncio.run(
        unary_latency(topology.dial, profile.latency_calls, profile.latency_warmup, time_limit=60.0)
    )
    return {
        "p50_ms": result.percentile(50) * 1e3,
        "p99_ms": result.percentile(99) * 1e3,
        "calls": len(result.seconds),
        "errors": result.errors,
    }


def measure_h2load(topology: Topology, profile: Profile, tools: Tools) -> dict[str, Any]:
    """Requests/s at 64 streams from h2load, after checking its body gets a good answer."""
    if tools.h2load is None:
        return {"skipped": "h2load is not installed"}
    response_bytes = asyncio.run(verify_body(topology.dial, tools.body_file.read_bytes()))
    window = Window(topology)
    # h2load runs warm-up then measurement; the CPU window is opened when measurement starts.
    timer = threading.Timer(profile.h2load_warmup, window.start)
    timer.start()
    try:
        result = run_h2load(
            tools.h2load,
            topology.address,
            tools.body_file,
            connections=profile.h2load_connections,
            streams=profile.h2load_streams,
            duration=profile.h2load_duration,
            warmup=profile.h2load_warmup,
            response_bytes=response_bytes,
            headers=topology.dial.h2load_headers(),
        )
    finally:
        timer.cancel()
        timer.join(5)
    return {
        **result.as_dict(),
        "verified_response_bytes": response_bytes,
        "cpu": window.stop(result.succeeded),
    }


def measure_python_throughput(topology: Topology, profile: Profile) -> dict[str, Any]:
    """Calls/s with 64 calls in flight from one asyncio process."""
    window = Window(topology)

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        loop.call_later(profile.python_warmup, window.start)
        return await unary_throughput(
            topology.dial,
            profile.python_concurrency,
            profile.python_duration,
            profile.python_warmup,
        )

    result = asyncio.run(run())
    return {
        "rps": result.rate,
        "calls": result.count,
        "errors": result.errors,
        "concurrency": profile.python_concurrency,
        "cpu": window.stop(result.count),
    }


def measure_streams(topology: Topology, profile: Profile) -> dict[str, Any]:
    """Messages/s and MB/s for each (size, streams) shape."""
    out: dict[str, Any] = {}
    for size, streams in STREAM_SHAPES:
        count = profile.stream_count(size, streams)
        window = Window(topology)
        window.start()
        run = asyncio.run(stream_throughput(topology.dial, streams, count, size, 60.0))
        out[f"{size}x{streams}"] = {
            "size": size,
            "streams": streams,
            "count_per_stream": count,
            "messages": run.messages,
            "seconds": run.seconds,
            "msgs_per_s": run.messages_per_second,
            "mb_per_s": run.megabytes_per_second,
            "errors": run.errors,
            "cpu": window.stop(run.messages),
        }
    return out


def measure_round(topology: Topology, profile: Profile, tools: Tools) -> dict[str, Any]:
    """Every phase of one round on one topology."""
    t0 = time.monotonic()
    out: dict[str, Any] = {}
    phases: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("latency", lambda: measure_latency(topology, profile)),
        ("h2load", lambda: measure_h2load(topology, profile, tools)),
        ("python", lambda: measure_python_throughput(topology, profile)),
        ("streams", lambda: measure_streams(topology, profile)),
    ]
    for name, phase in steps:
        if name not in topology.phases:
            continue
        started = time.monotonic()
        try:
            out[name] = phase()
        except Exception as exc:  # recorded, counted as an error, and the run goes on
            out[name] = {"phase_failed": f"{type(exc).__name__}: {exc}"[:2000]}
        phases[name] = time.monotonic() - started
    out["phase_seconds"] = phases
    out["seconds"] = time.monotonic() - t0
    return out
