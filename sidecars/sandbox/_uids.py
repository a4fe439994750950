"""Host uids for sandboxed plugins: one per plugin, never shared with another mesh.

When the orchestrator runs as root, each plugin runs as its own unprivileged
host uid. A uid is taken by holding an exclusive lock on a file named after
it for the life of the orchestrator, so two meshes on one host never hand
out the same uid, and a mesh that dies (even by SIGKILL) frees its uids.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pwd
from pathlib import Path

#: Where the lock files live (root-only).
LOCK_DIR = Path("/run/sidemesh-uids") if Path("/run").is_dir() else Path("/tmp/sidemesh-uids")


def _taken_by_account(uid: int) -> bool:
    """Whether ``uid`` belongs to an account, or to a user's /etc/subuid range, on this host."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    return any(start <= uid < start + count for start, count in _subuid_ranges())


@functools.cache
def _subuid_ranges() -> tuple[tuple[int, int], ...]:
    ranges = []
    try:
        for line in Path("/etc/subuid").read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                ranges.append((int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return tuple(ranges)


class UidAllocator:
    """Hands out uids from ``[base, base + count)`` that no other live mesh holds."""

    def __init__(self, base: int, count: int = 10_000, lock_dir: Path = LOCK_DIR) -> None:
        self._base = base
        self._count = count
        self._dir = lock_dir
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (uid, lock fd)

    def uid_for(self, owner: str) -> int:
        """The uid of ``owner`` (a plugin), allocating one the first time."""
        if owner in self._held:
            return self._held[owner][0]
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for uid in range(self._base, self._base + self._count):
            if _taken_by_account(uid):
                continue
            fd = os.open(self._dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held[owner] = (uid, fd)
            return uid
        raise OSError(
            f"no free sandbox uid in {self._base}..{self._base + self._count - 1}: "
            "raise sandbox.uid_base or stop other meshes"
        )

    def release(self) -> None:
        """Frees every uid this allocator holds."""
        for _, fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
