"""Host uids for sandboxed plugins: one per plugin, the same every run, never another mesh's.

When the orchestrator runs as root, each plugin runs as its own unprivileged
host uid. The uid is **stable**: derived from the plugin's name (a hash into
``[base, base + count)``) and remembered in the mesh's state dir
(``uids.json``), so the files a plugin writes to its data dir or to an
operator's rw mount are still its own after a restart, and an operator can
give a directory to it once (``sidemesh plugins -v`` shows the uid).

A uid is taken by holding an exclusive lock on a file named after it for the
life of the orchestrator, so two meshes on one host never hand out the same
uid, and a mesh that dies (even by SIGKILL) frees its uids. When the uid a
name hashes to is taken (an account, a /etc/subuid range, another plugin of
this mesh, another live mesh), the next free one is taken and remembered.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import pwd
from pathlib import Path

#: Where the lock files live (root-only).
LOCK_DIR = Path("/run/sidemesh-uids") if Path("/run").is_dir() else Path("/tmp/sidemesh-uids")
#: The uids the allocator hands out: ``[base, base + DEFAULT_COUNT)``.
DEFAULT_COUNT = 65_536
#: The file in the state dir that remembers each plugin's uid.
REGISTRY_FILE = "uids.json"

log = logging.getLogger("sidemesh.sandbox")


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


def preferred_uid(owner: str, base: int, count: int) -> int:
    """The uid ``owner``'s name hashes to: the same on every host and every run."""
    digest = hashlib.sha256(owner.encode()).digest()
    return base + int.from_bytes(digest[:8], "big") % count


class UidAllocator:
    """Hands out stable uids from ``[base, base + count)`` that no other live mesh holds.

    ``registry``: the state dir's ``uids.json`` (None: nothing is remembered,
    a uid is still derived from the name).
    """

    def __init__(
        self,
        base: int,
        count: int = DEFAULT_COUNT,
        lock_dir: Path = LOCK_DIR,
        registry: Path | None = None,
    ) -> None:
        self._base = base
        self._count = count
        self._dir = lock_dir
        self._registry = registry
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (uid, lock fd)

    def uid_for(self, owner: str) -> int:
        """The uid of ``owner`` (a plugin): the one it had last time, whenever it can be."""
        if owner in self._held:
            return self._held[owner][0]
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        known = self._remembered()
        last = known.get(owner)
        # Another plugin's uid stays its own, even while that plugin is not in the mesh.
        others = {uid for name, uid in known.items() if name != owner}
        start = preferred_uid(owner, self._base, self._count) - self._base
        candidates = [self._base + (start + i) % self._count for i in range(self._count)]
        if last is not None and self._base <= last < self._base + self._count:
            candidates.insert(0, last)
        for uid in candidates:
            if (uid in others and uid != last) or _taken_by_account(uid):
                continue
            fd = self._lock(uid)
            if fd is None:
                continue
            self._held[owner] = (uid, fd)
            if last is not None and uid != last:
                log.warning(
                    "plugin %s: its uid %d is held by another mesh on this host: it runs as %d "
                    "(files it owned as %d are not its own any more)", owner, last, uid, last,
                )  # fmt: skip
            if uid != last:
                self._remember(owner, uid)
            return uid
        raise OSError(
            f"no free sandbox uid in {self._base}..{self._base + self._count - 1}: "
            "raise sandbox.uid_base or stop other meshes"
        )

    def _lock(self, uid: int) -> int | None:
        fd = os.open(self._dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _remembered(self) -> dict[str, int]:
        if self._registry is None:
            return {}
        try:
            data = json.loads(self._registry.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "%s cannot be read (%s): plugins' uids are derived anew", self._registry, exc
            )
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and type(v) is int}

    def _remember(self, owner: str, uid: int) -> None:
        if self._registry is None:
            return
        known = self._remembered()
        known[owner] = uid
        tmp = self._registry.with_name(f".{self._registry.name}.tmp")
        try:
            self._registry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(dict(sorted(known.items())), out, indent=1)
                out.write("\n")
            os.replace(tmp, self._registry)
        except OSError as exc:
            log.warning("%s cannot be written (%s): plugin %s's uid %d may change next run",
                        self._registry, exc, owner, uid)  # fmt: skip

    def release(self) -> None:
        """Frees every uid this allocator holds."""
        for _, fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
