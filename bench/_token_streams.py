"""Many concurrent slow token streams, as a mesh of agents makes them: CPU and inter-token delay.

Client processes (``bench._idle_client --gaps``) open ``streams`` agent
streams at once (paced like the idle streams), each receiving ``count`` deltas
of ``size`` bytes ``delay`` seconds apart: an LLM's tokens. Once every stream
is open, the harness measures for ``window`` seconds: the tokens delivered per
second, the CPU the forwarding process and the sidecar used (``/proc``), and
the gaps between consecutive deltas of each stream that arrived in the window
(p50/p99/p99.9/max; the floor is ``delay``).

Everything is bounded: the streams end by themselves after ``count x delay``
seconds, the clients by ``time_limit``.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._idle import _Client
from bench._lab import Topology
from bench._proc import CpuMeter


@dataclass(frozen=True)
class TokenPlan:
    """How the phase runs."""

    streams: int
    processes: int
    channels_per_process: int
    #: Deltas per stream, their size, and the sidecar's pause between two (1/rate).
    count: int
    size: int
    delay: float
    #: Seconds measured once every stream is open.
    window: float
    time_limit: float
    #: Streams each client process keeps waiting for their first delta at most.
    opening_window: int = 200

    @property
    def name(self) -> str:
        """``2000 streams x 2/s``."""
        return f"{self.streams} streams x {1 / self.delay:g}/s"


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def run_token_streams(topology: Topology, plan: TokenPlan) -> dict[str, Any]:
    """Runs the phase against ``topology`` (which must take plain HTTP/2 without credentials)."""
    tmp = Path(tempfile.mkdtemp(prefix="smtok"))
    try:
        return _run(topology, plan, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(topology: Topology, plan: TokenPlan, tmp: Path) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    per_process = [plan.streams // plan.processes] * plan.processes
    for i in range(plan.streams % plan.processes):
        per_process[i] += 1
    base = [sys.executable, "-m", "bench._idle_client", f"--address={topology.address}",
            f"--channels={plan.channels_per_process}", f"--count={plan.count}",
            f"--size={plan.size}", f"--delay={plan.delay}", f"--time-limit={plan.time_limit}",
            f"--window={plan.opening_window}"]  # fmt: skip
    t0 = time.monotonic()
    clients = [
        _Client([*base, f"--streams={n}", f"--gaps={tmp / f'gaps{i}.bin'}"], root)
        for i, n in enumerate(per_process)
        if n
    ]
    meter = CpuMeter({"proxy": topology.proxy_pids(), "sidecar": topology.sidecar_pids()})
    deadline = t0 + plan.time_limit + 10
    peak_open = 0
    all_open_at: float | None = None
    window: dict[str, Any] = {}
    start_lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and any(c.proc.poll() is None for c in clients):
        opened = sum(c.latest.get("opened", 0) for c in clients)
        finished = sum(c.latest.get("finished", 0) for c in clients)
        peak_open = max(peak_open, opened - finished)
        now = time.monotonic()
        if all_open_at is None and opened >= plan.streams:
            all_open_at = now - t0
            meter.start()
            window["start"] = now
            start_lines = [dict(c.latest) for c in clients]
        if "start" in window and "end" not in window and now >= window["start"] + plan.window:
            cpu = meter.stop()
            window.update(end=now, cpu=cpu, lines=[dict(c.latest) for c in clients])
            window["open_at_end"] = opened - finished
        time.sleep(0.1)
    for client in clients:
        client.finish(max(deadline - time.monotonic(), 1))
    totals = {
        key: sum(c.latest.get(key, 0) for c in clients)
        for key in ("started", "opened", "finished", "ok", "errors", "tokens")
    }
    out: dict[str, Any] = {
        "topology": topology.key,
        "streams": plan.streams,
        "client_processes": len(clients),
        "channels_per_process": plan.channels_per_process,
        "count": plan.count,
        "size": plan.size,
        "delay": plan.delay,
        "window_planned_seconds": plan.window,
        "time_limit": plan.time_limit,
        **{f"streams_{k}": v for k, v in totals.items()},
        "peak_open_at_once": peak_open,
        "all_open_after_seconds": all_open_at,
        "seconds": time.monotonic() - t0,
        "all_completed": totals["ok"] == plan.streams,
        "first_errors": [e for c in clients if (e := c.latest.get("first_error") or c.stderr)][:3],
    }
    if "end" not in window:
        out["window_missed"] = "the streams were not all open long enough to measure a window"
        return out
    start, end = window["start"], window["end"]
    wall = end - start
    tokens = 0.0
    for before, after in zip(start_lines, window["lines"], strict=True):
        tokens += after.get("tokens", 0) - before.get("tokens", 0)
    gaps: list[float] = []
    for path in sorted(tmp.glob("gaps*.bin")):
        pairs = array("d")
        pairs.frombytes(path.read_bytes())
        gaps += [pairs[i + 1] for i in range(0, len(pairs), 2) if start <= pairs[i] <= end]
    gaps.sort()
    cpu = window["cpu"]
    out.update(
        {
            "window_seconds": wall,
            "open_at_window_end": window["open_at_end"],
            "tokens_in_window": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "gaps_in_window": len(gaps),
            "gaps_ms": {
                "p50": _percentile(gaps, 50) * 1e3,
                "p99": _percentile(gaps, 99) * 1e3,
                "p999": _percentile(gaps, 99.9) * 1e3,
                "max": (gaps[-1] if gaps else math.nan) * 1e3,
            },
            "proxy_cpu_seconds": cpu["proxy"] if meter.pids["proxy"] else None,
            "proxy_cores": cpu["proxy"] / wall if meter.pids["proxy"] else None,
            "proxy_cpu_us_per_token": cpu["proxy"] / max(tokens, 1) * 1e6
            if meter.pids["proxy"]
            else None,
            "sidecar_cores": cpu["sidecar"] / wall,
            "sidecar_cpu_us_per_token": cpu["sidecar"] / max(tokens, 1) * 1e6,
        }
    )
    return out
