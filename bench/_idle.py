"""Many idle streams through one orchestrator: do they all complete, and what memory do they take.

Several client processes (``bench._idle_client``) open slow agent streams
(3 deltas, seconds apart) through one orchestrator. Meanwhile the harness
samples the orchestrator's RSS from ``/proc`` and sums the clients' progress:
the peak of streams open at once, and how many ended COMPLETED.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._proc import memory_kib, process_tree


@dataclass(frozen=True)
class IdlePlan:
    """How the phase runs."""

    streams: int
    processes: int
    channels_per_process: int
    count: int
    delay: float
    time_limit: float
    #: Streams each client process keeps waiting for their first delta at most.
    window: int = 200


class _Client:
    """One client process and its latest progress line."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            cwd=cwd, text=True,
        )  # fmt: skip
        self.latest: dict[str, Any] = {}
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.latest = json.loads(line)
            except ValueError:
                continue

    def finish(self, timeout: float) -> None:
        """Waits for the process (killing it past ``timeout``) and for its last line."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.stderr = self.proc.stderr.read()[-2000:]


def run_idle_streams(
    address: str, orchestrator_pid: int, sidecar_pid: int | None, plan: IdlePlan
) -> dict[str, Any]:
    """Runs the phase; returns what was seen, including the orchestrator's peak RSS."""
    root = Path(__file__).resolve().parent.parent
    before = memory_kib(orchestrator_pid)
    per_process = [plan.streams // plan.processes] * plan.processes
    for i in range(plan.streams % plan.processes):
        per_process[i] += 1
    t0 = time.monotonic()
    base = [sys.executable, "-m", "bench._idle_client", f"--address={address}",
            f"--channels={plan.channels_per_process}", f"--count={plan.count}",
            f"--delay={plan.delay}", f"--time-limit={plan.time_limit}",
            f"--window={plan.window}"]  # fmt: skip
    clients = [_Client([*base, f"--streams={n}"], root) for n in per_process if n]
    peak_open = peak_rss = peak_sidecar_rss = 0
    all_open_at: float | None = None
    sidecar_tree = process_tree(sidecar_pid) if sidecar_pid else []
    deadline = t0 + plan.time_limit + 10
    while time.monotonic() < deadline and any(c.proc.poll() is None for c in clients):
        opened = sum(c.latest.get("opened", 0) for c in clients)
        finished = sum(c.latest.get("finished", 0) for c in clients)
        peak_open = max(peak_open, opened - finished)
        if all_open_at is None and opened >= plan.streams:
            all_open_at = time.monotonic() - t0
        peak_rss = max(peak_rss, memory_kib(orchestrator_pid).get("VmRSS", 0))
        peak_sidecar_rss = max(
            peak_sidecar_rss, sum(memory_kib(p).get("VmRSS", 0) for p in sidecar_tree)
        )
        time.sleep(0.2)
    for client in clients:
        client.finish(max(deadline - time.monotonic(), 1))
    seconds = time.monotonic() - t0
    after = memory_kib(orchestrator_pid)
    totals = {
        key: sum(c.latest.get(key, 0) for c in clients)
        for key in ("started", "opened", "finished", "ok", "errors")
    }
    errors = [c.latest.get("first_error") or c.stderr for c in clients]
    return {
        "streams_requested": plan.streams,
        "client_processes": len(clients),
        "channels_per_process": plan.channels_per_process,
        "count": plan.count,
        "delay": plan.delay,
        "time_limit": plan.time_limit,
        "window_per_process": plan.window,
        **{f"streams_{k}": v for k, v in totals.items()},
        "peak_open_at_once": peak_open,
        "all_open_after_seconds": all_open_at,
        "seconds": seconds,
        "all_completed": totals["ok"] == plan.streams,
        "orchestrator_rss_before_kib": before.get("VmRSS", 0),
        "orchestrator_peak_rss_sampled_kib": peak_rss,
        "orchestrator_vmhwm_kib": after.get("VmHWM", 0),
        "sidecar_peak_rss_sampled_kib": peak_sidecar_rss,
        "first_errors": [e for e in errors if e][:3],
    }
