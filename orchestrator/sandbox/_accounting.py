"""The data dir quota where no image can be mounted: measured, and read-only while over.

The orchestrator walks the data dir (:func:`measure_tree`), never following a
symlink, counting each inode once (hard links) by the blocks it really
takes (sparse files), and stopping after the file quota, so no plugin can
make a measurement cost more than that. Between walks, the tripwire
(:mod:`._tripwire`) watches the bytes the plugin's processes write and
freezes the plugin as soon as they may have filled its quota; the next walk
decides. ``fallocate`` writes no bytes, so the sandbox refuses it here
(EOPNOTSUPP: glibc's ``posix_fallocate`` then writes the zeros itself).

When the data dir goes over its quota the supervisor kills the plugin's
sidecars and starts them again with the data dir read-only, until the
operator frees space or raises the quota.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from orchestrator.sandbox._quota import ACCOUNTED, DataUsage, max_files, mib
from orchestrator.sandbox._tripwire import SURVEY, TRIPWIRE, ProcessTree

#: A tree deeper than this is not measured (it would take one descriptor per level).
MAX_DEPTH = 128
#: Seconds between walks when no write points at growth; while read-only.
WALK_INTERVAL, READ_ONLY_INTERVAL = 0.5, 1.0
#: A walk waits this many times the last one's duration: measuring takes at most
#: a fifth of a core, however many files the plugin keeps.
COST_FACTOR = 4
#: Bytes a second a plugin is assumed to write at most (into the page cache), and the
#: longest the tripwire waits between looks at one plugin: it looks again before
#: a plugin writing that fast could fill what is left of its quota.
FASTEST_WRITES, LONGEST_LOOK = 4 << 30, 0.25
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def measure_tree(root: Path, max_entries: int, max_depth: int = MAX_DEPTH) -> DataUsage:
    """Bytes and entries under ``root``; ``problem`` says why the count is incomplete.

    Stops after ``max_entries`` entries. Entries the plugin renames or removes
    while it runs are counted where they are seen, or not at all.
    """
    try:
        top = _open_root(root)
    except OSError as exc:
        return DataUsage(0, 0, f"data dir cannot be measured: {exc.strerror}")
    st = os.fstat(top)
    walk = _Walk(st.st_dev, max_entries)
    walk.bytes = st.st_blocks * 512
    stack: list[tuple[int, Iterator[str]]] = []
    try:
        stack.append((top, iter(walk.scan(top))))
        while stack and not walk.problem:
            fd, pending = stack[-1]
            name = next(pending, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            if len(stack) >= max_depth:
                walk.problem = f"data dir nested deeper than {max_depth} levels: cannot be measured"
                break
            try:
                child = _open_dir(fd, name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone or replaced meanwhile
            except OSError as exc:
                walk.problem = f"data dir cannot be measured: {name}: {exc.strerror}"
                break
            stack.append((child, iter(walk.scan(child))))
    except OSError as exc:
        walk.problem = f"data dir cannot be measured: {exc.strerror}"
    finally:
        for fd, _ in stack:
            os.close(fd)
    return DataUsage(walk.bytes, walk.entries, walk.problem)


class _Walk:
    def __init__(self, device: int, max_entries: int) -> None:
        self.device = device
        self.max_entries = max_entries
        self.bytes = 0
        self.entries = 0
        self.problem = ""
        self._linked: set[int] = set()

    def scan(self, fd: int) -> list[str]:
        """Counts the entries of one directory; returns its subdirectories' names."""
        subdirs = []
        with os.scandir(fd) as entries:
            for entry in entries:
                self.entries += 1
                if self.entries > self.max_entries:
                    self.problem = f"data dir quota ({self.max_entries} files) exceeded"
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self.bytes += st.st_blocks * 512
                    if st.st_dev == self.device:
                        _let_owner_in(fd, entry.name, st)
                        subdirs.append(entry.name)
                elif st.st_nlink > 1:
                    if st.st_ino not in self._linked:
                        self._linked.add(st.st_ino)
                        self.bytes += st.st_blocks * 512
                else:
                    self.bytes += st.st_blocks * 512
        return subdirs


def _open_root(root: Path) -> int:
    st = os.lstat(root)
    if st.st_mode & 0o500 != 0o500 and st.st_uid == os.geteuid() != 0:
        os.chmod(root, stat.S_IMODE(st.st_mode) | 0o700)  # see _let_owner_in
    return os.open(root, _DIR)


def _open_dir(parent: int, name: str) -> int:
    return os.open(name, _DIR, dir_fd=parent)


def _let_owner_in(parent: int, name: str, st: os.stat_result) -> None:
    """Gives the owner back read and search rights the plugin took from a directory of ours.

    Without root the orchestrator can read a directory only with those rights;
    the plugin's files are the orchestrator's uid (mapped), so it may restore
    them. The change goes through a descriptor, never a path a symlink could redirect.
    """
    if st.st_mode & 0o500 == 0o500 or os.geteuid() == 0 or st.st_uid != os.geteuid():
        return
    with contextlib.suppress(OSError):
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(os.fstat(fd).st_mode) | 0o700)
        finally:
            os.close(fd)


class DataAccount:
    """A data dir quota by measurement (see the module's docstring).

    Three threads use it: the orchestrator's loop (:meth:`due`, ``read_only``),
    a worker (:meth:`measure`) and the tripwire's (:meth:`poll`); the lock
    keeps what they share.
    """

    mechanism = ACCOUNTED
    tick = 0.05

    def __init__(self, data_dir: Path, quota_bytes: int) -> None:
        self.data_dir = data_dir
        self.quota_bytes = quota_bytes
        self.max_files = max_files(quota_bytes)
        self.read_only = False
        self._lock = threading.Lock()
        self._tree = ProcessTree()
        self._last = DataUsage(0, 0)
        self._pending = 0  # bytes written since the last walk began
        self._frozen = False  # the tripwire stopped the plugin...
        self._suspect = False  # ...and no walk has looked at it since
        self._next = 0.0  # the next periodic walk
        self._earliest = 0.0  # no walk the tripwire asks for before (its cost)
        self._survey_at = 0.0
        self._look_at = 0.0
        TRIPWIRE.add(self)

    def due(self, pids: Iterable[int], now: float) -> bool:
        """A walk is due periodically, or at once when the tripwire froze the plugin."""
        roots = tuple(pids)
        if roots != self._tree.roots:  # a replica (re)started: look for its processes now
            with self._lock:
                self._tree.roots = roots
                self._survey_at = self._look_at = 0.0
        return self._suspect or now >= self._next

    def poll(self, now: float) -> float:
        """Freezes the plugin when what it wrote may have filled its quota (tripwire thread).

        Returns when to look again: as soon as a plugin writing at
        ``FASTEST_WRITES`` could fill what is left (often near the quota, seldom
        far from it).
        """
        with self._lock:
            if self.read_only or self._frozen:
                return now + LONGEST_LOOK
            if now < self._look_at:
                return self._look_at
            surveyed = now >= self._survey_at
            if surveyed:  # new processes (a forked writer); the costlier look
                self._tree.survey()
            self._pending += self._tree.written()
            room = self.quota_bytes - self._last.used_bytes - self._pending
            if room >= 0 or now < self._earliest:
                wait = min(max(room, 0) / FASTEST_WRITES, LONGEST_LOOK)
                self._look_at = now + wait
                if surveyed:
                    self._survey_at = now + max(wait, SURVEY)
                return self._look_at
            self._tree.signal(signal.SIGSTOP)
            self._tree.survey()  # what it forked meanwhile
            self._tree.signal(signal.SIGSTOP)
            self._frozen = self._suspect = True
            return now + LONGEST_LOOK

    def measure(self) -> DataUsage:
        """Walks the data dir; ``problem`` when it is over its quota (or cannot be measured).

        A plugin the tripwire froze goes on when it is under its quota; over it,
        it stays stopped until the orchestrator kills it.
        """
        t0 = time.monotonic()
        with self._lock:
            before = self._pending
        usage = measure_tree(self.data_dir, self.max_files)
        if not usage.problem and usage.used_bytes > self.quota_bytes:
            usage = DataUsage(
                usage.used_bytes,
                usage.files,
                f"data dir quota ({mib(self.quota_bytes)}) exceeded: {mib(usage.used_bytes)} "
                f"in {usage.files} files",
            )
        now = time.monotonic()
        cost = (now - t0) * COST_FACTOR
        with self._lock:
            self._pending -= before  # what was written during the walk may not be in it
            self._suspect = False
            self._look_at = 0.0  # room changed: look again now
            self._last = usage
            self._earliest = now + cost
            self._next = now + max(READ_ONLY_INTERVAL if self.read_only else WALK_INTERVAL, cost)
            if self._frozen and not usage.problem:
                self._tree.signal(signal.SIGCONT)
                self._frozen = False
        return usage

    def close(self) -> None:
        """Stops watching; never leaves a process stopped."""
        TRIPWIRE.remove(self)
        with self._lock:
            if self._frozen:
                self._tree.signal(signal.SIGCONT)
            self._tree.close()
