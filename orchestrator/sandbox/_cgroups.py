"""Memory and process-count limits per sidecar with cgroups (v1 controllers, or v2).

Each replica gets its own cgroup under the orchestrator's, so a plugin's
memory and processes are capped and counted apart from everything else. The
sidecar joins it before it executes anything (see ``_command``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")


@functools.cache
def _layout() -> tuple[str, dict[str, Path]]:
    """``("v1"|"v2", {controller: directory of this process's cgroup})``; empty when unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "", {}
    v1: dict[str, Path] = {}
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller in ("memory", "pids"):
                v1[controller] = _ROOT / controller / path.lstrip("/")
        if controllers == "":
            unified = path
    if len(v1) == 2:
        return "v1", v1
    if unified is not None and (_ROOT / "cgroup.controllers").exists():
        base = _ROOT / unified.lstrip("/")
        return "v2", {"memory": base, "pids": base}
    return "", {}


@functools.cache
def cgroup_support() -> str:
    """Empty when sidecar cgroups can be made here; otherwise why not."""
    version, dirs = _layout()
    if not version:
        return "no memory and pids cgroup controllers are mounted"
    probe_name = f"sidemesh-probe-{os.getpid()}"
    try:
        if version == "v2":
            _enable_v2_controllers(dirs["memory"])
        for base in set(dirs.values()):
            (base / probe_name).mkdir()
            (base / probe_name).rmdir()
    except OSError as exc:
        return f"cgroups are not writable here ({version}: {exc.strerror or exc})"
    return ""


def _enable_v2_controllers(base: Path) -> None:
    control = base / "cgroup.subtree_control"
    if not {"memory", "pids"} <= set(control.read_text().split()):
        control.write_text("+memory +pids")


class ReplicaCgroup:
    """The cgroup(s) of one sidecar process tree: limits, counters, cleanup."""

    def __init__(self, name: str, memory_bytes: int, max_processes: int) -> None:
        version, dirs = _layout()
        self.version = version
        self.memory_bytes = memory_bytes
        self.max_processes = max_processes
        mesh = f"sidemesh-m{os.getpid()}"
        self.dirs = {c: d / mesh / name for c, d in dirs.items()}
        for directory in set(self.dirs.values()):
            directory.mkdir(parents=True, exist_ok=True)
        memory, pids = self.dirs["memory"], self.dirs["pids"]
        if version == "v1":
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # without swap accounting the file is absent
                (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        else:
            (memory / "memory.max").write_text(str(memory_bytes))
            (memory / "memory.swap.max").write_text("0")
        (pids / "pids.max").write_text(str(max_processes))
        self._oom_kills = self.oom_kills()
        self._pid_hits = self.pid_limit_hits()

    @property
    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to join this cgroup."""
        return [d / "cgroup.procs" for d in sorted(set(self.dirs.values()))]

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed so far."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        return _counter(self.dirs["memory"] / name, "oom_kill")

    def pid_limit_hits(self) -> int:
        """How many forks the process limit has refused so far."""
        return _counter(self.dirs["pids"] / "pids.events", "max")

    def new_events(self) -> list[str]:
        """ResourceLimits reached since the last call, in words."""
        events = []
        kills, hits = self.oom_kills(), self.pid_limit_hits()
        if kills > self._oom_kills:
            events.append(f"memory limit ({self.memory_bytes >> 20} MiB) reached: process killed")
        if hits > self._pid_hits:
            events.append(
                f"process limit ({self.max_processes}) reached: {hits - self._pid_hits} "
                "fork(s) refused"
            )
        self._oom_kills, self._pid_hits = kills, hits
        return events

    def killed_by_memory_limit(self) -> bool:
        """Whether the memory limit killed a process since the cgroup was made."""
        return self.oom_kills() > 0

    def remove(self) -> None:
        """Kills anything left inside and removes the cgroup(s)."""
        for _ in range(50):
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for directory in set(self.dirs.values()):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def _pids(self) -> list[int]:
        pids: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
        return sorted(pids)


def remove_mesh_cgroups() -> None:
    """Removes this orchestrator's (now empty) parent cgroups."""
    _, dirs = _layout()
    for base in set(dirs.values()):
        with contextlib.suppress(OSError):
            (base / f"sidemesh-m{os.getpid()}").rmdir()


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
