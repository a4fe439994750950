"""Stops a plugin the moment its writes may have filled its accounted data quota.

A plugin writes to the page cache at gigabytes a second: a quota measured
every half second would let it run hundreds of MiB past. So one thread per
orchestrator looks every few milliseconds at the bytes each accounted
plugin's processes have written (``write_bytes`` of ``/proc/<pid>/io``:
counted when a write, a direct write or an mmap store dirties the page
cache, whichever directory it lands in; a few microseconds to read). When
what the data dir held at its last measurement plus what was written since
would pass the quota, the account freezes the plugin (SIGSTOP to each of its
processes, by pidfd), and the orchestrator's next measurement, of a tree
that no longer moves, decides: under its quota, the plugin goes on
(SIGCONT); over it, it is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Protocol

#: Seconds between looks at the bytes written, and between looks for new processes,
#: at the most; the longest the thread sleeps (a new account is looked at by then).
POLL, SURVEY, LONGEST_SLEEP = 0.005, 0.02, 0.05
_MAX_PROCESSES = 4096

log = logging.getLogger("sidemesh.sandbox")


class _Process:
    """One process of a sidecar's tree: a pidfd (signals reach it, not a reused pid)."""

    __slots__ = ("io", "pidfd", "written")

    def __init__(self, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        try:
            self.io = os.open(f"/proc/{pid}/io", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self.pidfd)
            raise
        self.written = 0

    def write_bytes(self) -> int | None:
        """What the process has written so far (with its reaped children); None once gone."""
        try:
            text = os.pread(self.io, 512, 0)
            at = text.index(b"write_bytes:") + 12
            return int(text[at : text.index(b"\n", at)])
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        os.close(self.io)
        os.close(self.pidfd)


class ProcessTree:
    """The processes below some root pids, and the bytes they write. Not thread-safe."""

    def __init__(self) -> None:
        #: The sidecars' pids (set by the orchestrator as replicas come and go).
        self.roots: tuple[int, ...] = ()
        self._processes: dict[int, _Process] = {}

    def survey(self) -> None:
        """Finds the processes below the roots now; forgets those that are gone."""
        found: set[int] = set()
        todo = list(self.roots)
        while todo and len(found) < _MAX_PROCESSES:
            pid = todo.pop()
            if pid in found:
                continue
            found.add(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    todo += _children(f"/proc/{pid}/task/{task}/children")
        for pid in set(self._processes) - found:
            self._processes.pop(pid).close()
        for pid in found - set(self._processes):
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
                self._processes[pid] = _Process(pid)

    def written(self) -> int:
        """Bytes written since the last call; a new process counts all it ever wrote.

        A child's bytes count again when its parent reaps it: an overestimate,
        which only brings a measurement forward.
        """
        total = 0
        for process in self._processes.values():
            now = process.write_bytes()
            if now is not None:
                total += now - process.written if now >= process.written else now
                process.written = now
        return total

    def signal(self, signum: int) -> None:
        """Sends ``signum`` to every process of the tree (those already gone are skipped)."""
        for process in self._processes.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(process.pidfd, signum)

    def close(self) -> None:
        for process in self._processes.values():
            process.close()
        self._processes.clear()


def _children(path: str) -> list[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return [int(child) for child in os.read(fd, 65536).split()]
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)


class Watched(Protocol):
    """What the tripwire looks at: an accounted data dir."""

    def poll(self, now: float) -> float:
        """Looks at what was written since the last poll; returns when to look next."""
        ...


class Tripwire:
    """The thread that polls every watched account; started with the first one."""

    def __init__(self) -> None:
        self._watched: list[Watched] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, watched: Watched) -> None:
        with self._lock:
            self._watched.append(watched)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sidemesh data tripwire", daemon=True
                )
                self._thread.start()

    def remove(self, watched: Watched) -> None:
        with self._lock:
            if watched in self._watched:
                self._watched.remove(watched)

    def watching(self) -> Iterable[Watched]:
        with self._lock:
            return list(self._watched)

    def _run(self) -> None:
        wake = 0.0
        while True:
            time.sleep(max(POLL, wake - time.monotonic()))
            now = time.monotonic()
            wake = now + LONGEST_SLEEP
            for watched in self.watching():
                try:
                    wake = min(wake, watched.poll(now))
                except Exception:  # a bug of ours: never let one plugin stop the others' watch
                    log.exception("the data tripwire failed to look at %r", watched)


#: The orchestrator's one tripwire thread.
TRIPWIRE = Tripwire()
