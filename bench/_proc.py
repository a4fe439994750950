"""What the kernel says about processes and the host: CPU time, memory, CPU steal.

Everything here reads ``/proc``; nothing is estimated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Clock ticks per second, the unit of ``/proc/<pid>/stat`` and ``/proc/stat`` times.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (nginx's workers, a sandboxed sidecar below bwrap)."""
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 10_000:
        current = todo.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` (all their threads), in seconds; gone pids count 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in KiB; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def own_cpu_seconds() -> float:
    """CPU of this process and of every child it has reaped (and their reaped children)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class HostCpu:
    """The host's aggregate CPU counters from ``/proc/stat``, in ticks."""

    total: int
    steal: int
    #: Idle plus iowait: time nothing ran.
    idle: int

    @classmethod
    def read(cls) -> HostCpu:
        """The counters now."""
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        # already counted in user/nice, so it is left out of the total.
        total = sum(fields[:8])
        steal = fields[7] if len(fields) > 7 else 0
        return cls(total=total, steal=steal, idle=fields[3] + fields[4])

    def since(self, earlier: HostCpu) -> dict[str, float]:
        """Steal and busy shares (0..1) of the time between ``earlier`` and this reading."""
        total = max(self.total - earlier.total, 1)
        steal = self.steal - earlier.steal
        idle = self.idle - earlier.idle
        return {
            "steal": steal / total,
            "busy": 1 - idle / total,
            "wall_seconds": total / CLK_TCK / max(os.cpu_count() or 1, 1),
            # CPU time spent running something on this host (steal is not running).
            "used_cpu_seconds": (total - idle - steal) / CLK_TCK,
        }


class CpuMeter:
    """CPU time of a set of processes over a phase: ``start()``, then ``stop()``."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def start(self) -> None:
        """Reads the processes' CPU time at the start of the phase."""
        self._start = {name: cpu_seconds(p) for name, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """CPU seconds each named group used since :meth:`start`."""
        return {name: cpu_seconds(p) - self._start.get(name, 0.0) for name, p in self.pids.items()}
