"""The data dir quota: how much one plugin's data directory may hold, and what it holds.

Two mechanisms enforce it, chosen per plugin when the mesh starts:

- ``ext4 image`` (:mod:`._image`, the orchestrator is root and has loop devices):
  the data dir is a filesystem of the quota's size, so the kernel refuses a
  write past it (ENOSPC) and the host never holds more than the image.
- ``accounted`` (:mod:`._accounting`, everywhere else): the orchestrator
  measures the data dir, and while it is over its quota the plugin's sidecars
  run with the data dir read-only.

Both also bound the number of files (an inode quota), which in turn bounds the
orchestrator's work to measure the directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

MIB = 1 << 20
#: One file per this many bytes of quota (ext4's own ratio for small filesystems is 4 KiB).
BYTES_PER_FILE = 8 << 10
MIN_FILES, MAX_FILES = 1024, 100_000

IMAGE = "ext4 image"
ACCOUNTED = "accounted"


def max_files(quota_bytes: int) -> int:
    """The file (inode) quota that goes with a byte quota."""
    return max(MIN_FILES, min(MAX_FILES, quota_bytes // BYTES_PER_FILE))


def mib(n: int) -> str:
    """``16 MiB``, ``3.2 MiB``: a byte count as people read it."""
    value = n / MIB
    return f"{value:.0f} MiB" if value >= 100 or value == int(value) else f"{value:.1f} MiB"


@dataclass(frozen=True)
class DataUsage:
    """One measurement of a plugin's data dir."""

    used_bytes: int
    files: int
    #: Why the data dir is at or over its quota, in words; empty when it is not.
    problem: str = ""


class QuotaError(Exception):
    """The data dir cannot be given its quota; the message says why and what to do."""


class DataQuota(Protocol):
    """A data dir quota in force: measured by the orchestrator's watcher."""

    #: ``ext4 image`` or ``accounted``.
    mechanism: str
    quota_bytes: int
    max_files: int
    #: Seconds between the watcher's looks at the data dir.
    tick: float
    #: The sidecars get the data dir read-only (accounted, while it is over its quota).
    read_only: bool

    def due(self, pids: Iterable[int], now: float) -> bool:
        """Cheap: whether :meth:`measure` should run now (``pids``: the sidecars' processes)."""
        ...

    def measure(self) -> DataUsage:
        """Measures the data dir (may block: call it in a worker thread)."""
        ...

    def close(self) -> None:
        """Releases the data dir (unmounts an image); safe to call twice."""
        ...
