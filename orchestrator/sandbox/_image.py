"""A plugin's data dir as an ext4 filesystem of its quota's size (the orchestrator is root).

Each plugin's data lives in a sparse image, ``<state_dir>/images/<plugin>.ext4``,
loop-mounted (``nosuid,nodev,noexec``) at its data dir for the mesh's
lifetime, so the kernel itself refuses writes past the quota (ENOSPC) and
the host never holds more of the plugin's data than the image's size. The
image remembers the quota it was made for in its label (``sidemesh-<MiB>``):
when the operator raises the quota it is grown, when they lower it, it is
shrunk if its data fits and the plugin is refused otherwise.

A mesh that dies (SIGKILL) leaves its mounts behind; the next mesh with the
same state dir removes them (and their loop devices) before it mounts again.
A lock file per image, held while mounted, tells a dead mesh's mount from a
live one's. A plain data dir from before (another mode, an older version) is
moved into a new image, or the plugin is refused when it does not fit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.sandbox._accounting import measure_tree
from orchestrator.sandbox._quota import (
    IMAGE,
    MAX_FILES,
    DataUsage,
    QuotaError,
    max_files,
    mib,
)

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_TOOLS = ("mke2fs", "e2fsck", "resize2fs", "e2label", "dumpe2fs", "mount", "umount", "losetup")
_MOUNT_OPTIONS = "loop,nosuid,nodev,noexec,noatime"
_LABEL = "sidemesh-"  # + the quota in MiB
_SUFFIX = ".ext4"
_BLOCK = 4096
_INODE = 256
#: ext4's inodes 1 to 10 (the root directory is one of them).
_RESERVED_INODES = 10
_TIMEOUT = 300.0


class ImageUnavailable(Exception):
    """No image can be made or mounted here (no free loop device, mount not allowed...)."""


def image_support() -> str:
    """Empty when data dirs can be ext4 images on this host; otherwise why not."""
    if os.geteuid() != 0:
        return "the orchestrator is not root (loop mounts need root)"
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_PATH) is None]
    if missing:
        return f"{', '.join(missing)} not found (packages e2fsprogs, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "the host has no loop devices (/dev/loop-control)"
    return ""


def journal_mib(quota_bytes: int) -> int:
    """The journal's size: ext4's minimum (1024 blocks) for small quotas, at most 64 MiB."""
    return max(4, min(64, (quota_bytes >> 20) // 64))


def estimated_image_bytes(quota_bytes: int) -> int:
    """A first guess at the image size whose filesystem holds ``quota_bytes`` of data.

    ext4 takes room of its own: the journal, inode tables, bitmaps and group
    descriptors, and 2% (at most 4096 blocks) it keeps free for allocations in
    flight (there are no blocks reserved for root: ``-m 0``). :meth:`DataImage._create`
    then corrects the guess by what ``mke2fs`` actually made.
    """
    size = (
        quota_bytes
        + (journal_mib(quota_bytes) << 20)
        + max_files(quota_bytes) * _INODE
        + min(quota_bytes // 49, 4096 * _BLOCK)
        + (quota_bytes // (_BLOCK * 32768) + 1) * 16 * _BLOCK
    )
    return _blocks(size)


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _inode_count(files: int, size: int) -> int:
    """The ``mke2fs -N`` that gives at most ``files`` inodes besides ext4's reserved ones.

    mke2fs rounds each block group's inodes up to fill their table's blocks:
    ask for a multiple of that, rounded down.
    """
    groups = -(-size // (_BLOCK * 32768))
    step = groups * (_BLOCK // _INODE)
    return (files + _RESERVED_INODES) // step * step


def capacity_of(image: Path) -> int | None:
    """Bytes of data the filesystem in ``image`` holds (as the kernel will count them).

    None when ``dumpe2fs`` does not tell its overhead (e2fsprogs before 1.46).
    """
    fields = _superblock(image)
    blocks, overhead = fields.get("Block count", ""), fields.get("Overhead clusters", "")
    if not (blocks.isdigit() and overhead.isdigit()):
        return None
    free_reserve = min(int(blocks) // 50, 4096)  # ext4's reserve for delayed allocation
    return (int(blocks) - int(overhead) - free_reserve) * _BLOCK


class DataImage:
    """One plugin's data dir, mounted from its ext4 image; :meth:`close` unmounts it."""

    mechanism = IMAGE
    tick = 0.25
    read_only = False

    def __init__(self, image: Path, data_dir: Path, quota_bytes: int, owner: int) -> None:
        self.image = image
        self.data_dir = data_dir
        self.quota_bytes = quota_bytes
        self.max_files = max_files(quota_bytes)
        self.owner = owner
        #: What opening did besides mounting (stale mounts removed, data moved, resized).
        self.notes: list[str] = []
        #: Seconds opening took (fsck, mkfs or resize, mount).
        self.setup_seconds = 0.0
        self._lock: int | None = None
        self._mounted = False
        self._full = False

    # -- opening ------------------------------------------------------------

    @classmethod
    def open(cls, image: Path, data_dir: Path, quota_bytes: int, owner: int) -> DataImage:
        """Mounts the plugin's image at ``data_dir``, making, moving into or resizing it first.

        Raises :class:`QuotaError` when the plugin must not start (its data does not
        fit, another mesh uses it), :class:`ImageUnavailable` when no image can be
        used here and the plugin has none yet (then it is accounted instead).
        """
        volume = cls(image, data_dir, quota_bytes, owner)
        t0 = time.monotonic()
        try:
            volume._open()
        except BaseException:
            volume.close()
            raise
        volume.setup_seconds = time.monotonic() - t0
        return volume

    def _open(self) -> None:
        self.image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._take_lock()
        self._remove_stale()
        self._recover_migration()
        fresh = not self.image.exists()
        if fresh:
            self._create()
        else:
            if _entries(self.data_dir):
                raise QuotaError(
                    f"the data dir {self.data_dir} holds files, and the plugin's data image "
                    f"{self.image} exists too (was the mesh run with its sandbox off?): move "
                    "one of them away"
                )
            self._check()
        try:
            self._mount()
        except ImageUnavailable:
            if fresh:  # nothing of the plugin's is in it: let the plugin be accounted instead
                self._drop_fresh_image()
            raise
        if not fresh:
            self._resize()
        os.chown(self.data_dir, self.owner, self.owner)
        os.chmod(self.data_dir, 0o700)
        _start_reaper(self.image.parent, self.data_dir.parent)
        with contextlib.suppress(OSError):  # e2fsck makes it again if ever needed
            (self.data_dir / "lost+found").rmdir()

    def _take_lock(self) -> None:
        # A little patience: the reaper of a mesh that just stopped may hold it for a moment.
        for _ in range(20):
            self._lock = _try_lock(self.image)
            if self._lock is not None:
                return
            time.sleep(0.1)
        raise QuotaError(
            f"its data image {self.image} is in use by another running mesh with the same "
            "state_dir: stop that mesh, or give this one a state_dir of its own"
        )

    def _remove_stale(self) -> None:
        self.notes += _remove_stale(self.image, self.data_dir)

    def _recover_migration(self) -> None:
        """Finishes or undoes a move of a plain data dir into an image that was interrupted."""
        new, old = self._staged(), self._moved_away()
        new.unlink(missing_ok=True)
        if old.exists():
            if self.image.exists():  # the move was committed: only the old copy is left
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.data_dir.rmdir()
                old.rename(self.data_dir)

    def _staged(self) -> Path:
        return self.image.with_suffix(".new")

    def _moved_away(self) -> Path:
        return self.image.with_suffix(".old")

    def _create(self) -> None:
        staged = self._staged()
        populate = bool(_entries(self.data_dir))
        with open(staged, "wb") as image:
            os.fchmod(image.fileno(), 0o600)

        def mke2fs(size: int, *extra: str) -> None:
            os.truncate(staged, size)
            _run(
                "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(_BLOCK), "-I", str(_INODE), "-m", "0",
                "-N", str(_inode_count(self.max_files, size)),
                "-L", f"{_LABEL}{self.quota_bytes >> 20}",
                "-J", f"size={journal_mib(self.quota_bytes)}",
                "-E", f"root_owner={self.owner}:{self.owner},lazy_journal_init=1",
                *extra, str(staged),
            )  # fmt: skip

        try:
            # Empty filesystems (a few milliseconds each, sparse) until one holds the quota
            # and hardly more: ext4's overhead is only known once made.
            size = estimated_image_bytes(self.quota_bytes)
            for _ in range(4):
                mke2fs(size)
                capacity = capacity_of(staged)
                if capacity is None or 0 <= capacity - self.quota_bytes < 16 * _BLOCK:
                    break
                size = _blocks(size + self.quota_bytes - capacity + 4 * _BLOCK)
            if populate:
                mke2fs(size, "-d", str(self.data_dir))
        except QuotaError as exc:
            staged.unlink(missing_ok=True)
            if populate:
                held = measure_tree(self.data_dir, 10 * MAX_FILES)
                raise QuotaError(
                    f"its data dir {self.data_dir} cannot be moved into a data image of its quota "
                    f"({mib(self.quota_bytes)}): it holds {mib(held.used_bytes)} in {held.files} "
                    f"files (at most {self.max_files}): raise its data_quota_mb or remove files "
                    "from the data dir"
                ) from exc
            raise ImageUnavailable(str(exc)) from exc
        if populate:
            # The commit is the image's rename: an interruption before it is undone at the
            # next start, one after it finished (see _recover_migration).
            moved = self._moved_away()
            self.data_dir.rename(moved)
            self.data_dir.mkdir(mode=0o700)
            staged.rename(self.image)
            shutil.rmtree(moved, ignore_errors=True)
            self.notes.append(f"moved the data dir's files into the data image {self.image}")
        else:
            staged.rename(self.image)

    def _drop_fresh_image(self) -> None:
        self.image.unlink(missing_ok=True)

    def _check(self, *, full: bool = False) -> None:
        """Replays the journal and repairs what is safe to repair (after a crash of the host)."""
        done = _run("e2fsck", "-p", *(["-f"] if full else []), str(self.image), check=False)
        if done.returncode & ~3:  # 1 and 2: errors corrected (a missing lost+found, say)
            raise QuotaError(
                f"its data image {self.image} has errors e2fsck -p cannot repair "
                f"({_last_line(done)}): run `e2fsck -f {self.image}`"
            )

    def _resize(self) -> None:
        """Grows or shrinks the mounted image when the operator changed the quota.

        Offline (resize2fs on the unmounted image: online resizing needs
        CAP_SYS_RESOURCE, which a root in a container may lack), measured after
        each step: new or removed block groups change ext4's own overhead.
        """
        made_for = _field(self.image, "Filesystem volume name").removeprefix(_LABEL)
        quota_mb = self.quota_bytes >> 20
        if not made_for.isdigit() or int(made_for) == quota_mb:
            return
        st = os.statvfs(self.data_dir)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        if used > self.quota_bytes:
            raise QuotaError(
                f"its data ({mib(used)} in {self.image}) does not fit its new data quota of "
                f"{mib(self.quota_bytes)} (it was {made_for} MiB): raise data_quota_mb again, or "
                f"remove files from {self.data_dir} first (a mesh with the old quota mounts it)"
            )
        for _ in range(4):
            capacity = self.capacity()
            if 0 <= capacity - self.quota_bytes < 64 * _BLOCK:
                break
            size = _blocks(self.image.stat().st_size + self.quota_bytes - capacity)
            size += 4 * _BLOCK if capacity < self.quota_bytes else 0
            self._unmount()
            self._check(full=True)  # resize2fs wants a freshly checked filesystem
            if size > self.image.stat().st_size:
                os.truncate(self.image, size)
                _run("resize2fs", str(self.image))
            else:
                _run("resize2fs", str(self.image), f"{size // 1024}K")
                os.truncate(self.image, size)
            self._mount()
        _run("e2label", str(self.image), f"{_LABEL}{quota_mb}")
        self.notes.append(f"resized its data image from {made_for} MiB to {quota_mb} MiB")

    def _mount(self) -> None:
        done = _run(
            "mount", "-t", "ext4", "-o", _MOUNT_OPTIONS, str(self.image), str(self.data_dir),
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ImageUnavailable(f"mount failed: {_last_line(done)}")
        self._mounted = True

    def _unmount(self) -> None:
        self._mounted = False
        _unmount(self.data_dir)
        for device in _loop_devices(self.image):
            _run("losetup", "-d", device, check=False)

    # -- while mounted -------------------------------------------------------

    def capacity(self) -> int:
        """Bytes of data the filesystem can hold."""
        st = os.statvfs(self.data_dir)
        return (st.f_blocks - (st.f_bfree - st.f_bavail)) * st.f_frsize

    def due(self, pids: object, now: float) -> bool:
        """A statvfs is cheap: every tick."""
        return True

    def measure(self) -> DataUsage:
        """What the filesystem holds; "full" from (nearly) the quota until 5% is free again.

        ext4 refuses writes a little before its last free block (delayed allocation
        keeps some in reserve), so "full" starts 1% short of the quota.
        """
        st = os.statvfs(self.data_dir)
        self.max_files = st.f_files - _RESERVED_INODES  # mke2fs rounds (see _inode_count)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        files = st.f_files - st.f_ffree - _RESERVED_INODES
        room = st.f_bavail * st.f_frsize
        margin = max(256 << 10, self.quota_bytes // 100)
        if used >= self.quota_bytes - margin or room < margin or st.f_favail == 0:
            self._full = True
        elif used < self.quota_bytes * 0.95 - margin and st.f_favail > st.f_files // 20:
            self._full = False
        if not self._full:
            return DataUsage(used, files)
        if st.f_favail == 0:
            problem = f"data dir quota ({self.max_files} files) full: new files fail with ENOSPC"
        else:
            problem = (
                f"data dir quota ({mib(self.quota_bytes)}) full: {mib(used)} in {files} files; "
                "writes past it fail with ENOSPC"
            )
        return DataUsage(used, files, problem)

    def close(self) -> None:
        """Unmounts the image, frees its loop device, releases the lock."""
        if self._mounted:
            with contextlib.suppress(QuotaError):
                self._unmount()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


# -- what a mesh that died leaves behind -----------------------------------------------


def _try_lock(image: Path) -> int | None:
    """The image's lock, held by the mesh that mounts it; None while another holds it."""
    fd = os.open(image.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_stale(image: Path, data_dir: Path) -> list[str]:
    """Unmounts what a mesh that died left mounted at ``data_dir``, frees ``image``'s loop
    devices; says what it did. The caller holds the image's lock."""
    notes = []
    for _ in range(8):
        if not _mounted_at(data_dir):
            break
        _unmount(data_dir)
        notes.append(f"removed a stale mount at {data_dir} (a mesh that died)")
    for device in _loop_devices(image):
        _run("losetup", "-d", device, check=False)
        notes.append(f"detached the stale loop device {device}")
    return notes


def release_abandoned(images: Path, data_root: Path) -> list[str]:
    """Unmounts every data image in ``images`` that no live mesh holds (see ``_reaper``)."""
    notes = []
    for image in sorted(images.glob(f"*{_SUFFIX}")):
        lock = _try_lock(image)
        if lock is None:  # a live mesh has it
            continue
        try:
            notes += _remove_stale(image, data_root / image.name.removesuffix(_SUFFIX))
        except QuotaError as exc:
            notes.append(str(exc))
        finally:
            os.close(lock)
    return notes


_reapers: set[Path] = set()


def _start_reaper(images: Path, data_root: Path) -> None:
    """Once per images directory: a process that unmounts them if this one dies unstopped.

    It runs in a session of its own, so a SIGKILL of the orchestrator, or of its
    process group, leaves it to clean up; the next mesh on the state dir would too.
    """
    if images in _reapers:
        return
    _reapers.add(images)
    env = {"PATH": _PATH, "LANG": "C"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sandbox._reaper", str(os.getpid()), str(images),
         str(data_root)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip


# -- helpers ---------------------------------------------------------------------


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0], path=_PATH) or argv[0]
    try:
        done = subprocess.run(
            [tool, *argv[1:]], capture_output=True, text=True, timeout=_TIMEOUT,
            env={"PATH": _PATH, "LANG": "C"}, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QuotaError(f"{argv[0]} failed: {exc}") from None
    if check and done.returncode != 0:
        raise QuotaError(f"{' '.join(argv)} failed: {_last_line(done)}")
    return done


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def _superblock(image: Path) -> dict[str, str]:
    """The fields ``dumpe2fs -h`` shows, e.g. ``Block count``."""
    fields = {}
    for line in _run("dumpe2fs", "-h", str(image)).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _field(image: Path, name: str) -> str:
    return _superblock(image).get(name, "")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, source) of every mount in this mount namespace, oldest first."""
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            dash = fields.index("-")
            found.append((_unescape(fields[4]), _unescape(fields[dash + 2])))
    return found


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def _mounted_at(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(point == target for point, _ in _mounts())


def _source_of(path: Path) -> str:
    target = os.path.realpath(path)
    sources = [source for point, source in _mounts() if point == target]
    if not sources:
        raise QuotaError(f"{path} is not mounted")
    return sources[-1]


def _unmount(path: Path) -> None:
    if _run("umount", str(path), check=False).returncode != 0:
        _run("umount", "--lazy", str(path))  # busy: detach now, free when the last user goes


def _loop_devices(image: Path) -> list[str]:
    """Loop devices backed by ``image``."""
    if not image.exists():
        return []
    listing = _run("losetup", "--associated", str(image), check=False).stdout
    return [line.split(":", 1)[0] for line in listing.splitlines() if line.startswith("/dev/")]


def _entries(directory: Path) -> bool:
    """Whether ``directory`` has anything in it."""
    try:
        with os.scandir(directory) as it:
            return any(True for _ in it)
    except FileNotFoundError:
        return False
