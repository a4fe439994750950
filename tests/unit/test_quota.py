"""The data dir quota's pieces: measuring a hostile tree, the ext4 image, the policy."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import sandbox
from orchestrator._launch import _own_tree
from orchestrator.sandbox._accounting import DataAccount, measure_tree
from orchestrator.sandbox._command import _LANDLOCK_EXEC
from orchestrator.sandbox._image import DataImage, _mounted_at, capacity_of
from orchestrator.sandbox._quota import max_files, mib
from orchestrator.sandbox._seccomp import filter_fd

MIB = 1 << 20
ROOT = os.geteuid() == 0
needs_images = pytest.mark.skipif(
    not ROOT or bool(sandbox.probe().data_image_why),
    reason=f"ext4 data images need root and loop devices: {sandbox.probe().data_image_why}",
)


def _write(path: Path, megabytes: float) -> None:
    path.write_bytes(b"\1" * int(megabytes * MIB))


# -- the file quota and words ---------------------------------------------------------------------


def test_the_file_quota_follows_the_byte_quota_within_bounds() -> None:
    assert max_files(16 * MIB) == 2048
    assert max_files(1 * MIB) == 1024  # at least
    assert max_files(1 << 40) == 100_000  # at most: a measurement stays bounded
    assert (mib(16 * MIB), mib(int(3.25 * MIB)), mib(300 * MIB)) == ("16 MiB", "3.2 MiB", "300 MiB")


# -- measuring a tree the plugin made -------------------------------------------------------------


def test_a_tree_is_measured_by_the_blocks_it_takes(tmp_path: Path) -> None:
    """Sparse files count what they take, hard links once, symlinks never their target."""
    _write(tmp_path / "a.bin", 2)
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "b.bin", 1)
    with open(tmp_path / "sparse.bin", "wb") as sparse:
        sparse.truncate(512 * MIB)
    for i in range(20):
        os.link(tmp_path / "a.bin", tmp_path / f"link-{i}")
    (tmp_path / "big").symlink_to(sys.executable)
    (tmp_path / "loop").symlink_to(tmp_path)
    usage = measure_tree(tmp_path, 1000)
    assert usage.problem == ""
    assert 3 * MIB <= usage.used_bytes < 3 * MIB + 64 * 1024, usage
    assert usage.files == 26  # a.bin, sub, b.bin, sparse.bin, 20 links, 2 symlinks


def test_a_measurement_stops_at_the_file_quota_and_at_its_depth(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").touch()
    usage = measure_tree(tmp_path, 20)
    assert usage.problem == "data dir quota (20 files) exceeded" and usage.files == 21

    deep = tmp_path / "deep"
    path = deep
    for _ in range(12):
        path = path / "d"
    path.mkdir(parents=True)
    usage = measure_tree(deep, 1000, max_depth=10)
    assert usage.problem == "data dir nested deeper than 10 levels: cannot be measured"
    assert measure_tree(deep, 1000, max_depth=20).problem == ""


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip


@pytest.mark.skipif(not ROOT, reason="makes the tree as another user")
def test_a_directory_the_plugin_locked_is_opened_again_and_counted() -> None:
    """Without root the orchestrator reads the plugin's tree (its own uid, mapped) only with
    the owner's rights, which the plugin may take away: they are given back, and counted."""
    with tempfile.TemporaryDirectory(prefix="smq") as top:
        os.chmod(top, 0o755)
        _locked_tree_is_counted(Path(top) / "data")


def _locked_tree_is_counted(data: Path) -> None:
    (data / "hidden").mkdir(parents=True)
    _write(data / "hidden" / "x.bin", 3)
    (data / "hidden" / "inner").mkdir()
    (data / "hidden" / "inner" / "y").touch()
    for path in [data, data / "hidden", data / "hidden" / "inner", *data.rglob("*")]:
        os.lchown(path, 65534, 65534)
    (data / "hidden" / "inner").chmod(0o100)  # search only
    (data / "hidden").chmod(0)
    data.chmod(0o300)  # the data dir itself: no reading
    code = (
        "from pathlib import Path\nfrom orchestrator.sandbox._accounting import measure_tree\n"
        f"u = measure_tree(Path({str(data)!r}), 100)\nprint(u.used_bytes, u.files, repr(u.problem))"
    )
    out = _as_nobody(code)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"nobody cannot import the mesh with {sys.executable}")
    assert out.returncode == 0, out.stderr
    used, files, problem = out.stdout.split(maxsplit=2)
    assert problem.strip() == "''" and int(files) == 4 and int(used) >= 3 * MIB, out.stdout


def _sidecar(tmp_path: Path, code: str) -> subprocess.Popen[bytes]:
    """A stand-in sidecar: waits for ``go``, then runs ``code`` in a child it forks."""
    script = (
        "import os, sys, time\n"
        f"while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.01)\n"
        "pid = os.fork()\n"
        f"if pid == 0:\n    {code}\n    open({str(tmp_path / 'done')!r}, 'w').close()\n"
        "    time.sleep(60); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    return subprocess.Popen([sys.executable, "-c", script])


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _until(predicate: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_writes_past_the_quota_freeze_the_plugin_until_a_walk_decides(tmp_path: Path) -> None:
    """A child the sidecar forked writes 2 MiB with a quota of 1 MiB: the tripwire stops the
    sidecar's processes at once, and a walk that finds the data dir over keeps them stopped."""
    data = tmp_path / "data"
    data.mkdir()
    sidecar = _sidecar(tmp_path, f"open({str(data / 'w.bin')!r}, 'wb').write(b'1' * {2 * MIB})")
    quota = DataAccount(data, 1 * MIB)
    try:
        assert quota.due([sidecar.pid], time.monotonic())  # the first walk is due
        assert quota.measure().problem == ""
        (tmp_path / "go").touch()
        # Done writing, or already stopped by the tripwire before it could say so.
        _until(
            lambda: (
                (tmp_path / "done").exists()
                or any(_state(c) == "T" for c in _children(sidecar.pid))
            ),
            "the write",
        )
        writer = _children(sidecar.pid)[0]
        if "\nwrite_bytes: 0\n" in Path(f"/proc/{writer}/io").read_text():
            pytest.skip("writes to tmp_path's filesystem are not counted (tmpfs?)")
        # The tripwire stops them and asks for a walk at once (a periodic walk may come
        # due before the tripwire thread gets its turn on a loaded machine: wait for both).
        # The writer stops a moment after the sidecar: the tripwire finds the child it
        # forked, then signals it, and a stop reaches a process running on another core
        # only once that core has handled it.
        _until(
            lambda: (
                _state(sidecar.pid) == "T"
                and _state(writer) == "T"
                and quota.due([sidecar.pid], time.monotonic())
            ),
            "the tripwire to stop the sidecar and its writer and ask for a walk",
        )
        usage = quota.measure()
        assert usage.problem == "data dir quota (1 MiB) exceeded: 2.0 MiB in 1 files", usage
        assert _state(writer) == "T"  # over: stopped until the orchestrator kills it
    finally:
        quota.close()  # never leaves one stopped
        _until(lambda: _state(sidecar.pid) != "T", "the sidecar to go on")
        sidecar.kill()
        sidecar.wait()


def test_rewriting_the_same_bytes_freezes_the_plugin_only_for_walks(tmp_path: Path) -> None:
    """Writing the same 256 KiB over and over passes the quota in bytes written, not in bytes
    held: the plugin is stopped for a walk now and then, and goes on after each."""
    data = tmp_path / "data"
    data.mkdir()
    rewrite = (
        f"fd = os.open({str(data / 'db')!r}, os.O_CREAT | os.O_WRONLY)\n"
        f"    [(os.pwrite(fd, b'2' * {MIB // 4}, 0), time.sleep(0.01)) for _ in range(64)]"
    )
    sidecar = _sidecar(tmp_path, rewrite)
    quota = DataAccount(data, 1 * MIB)
    try:
        quota.due([sidecar.pid], time.monotonic())
        quota.measure()
        (tmp_path / "go").touch()
        walks, deadline = 0, time.monotonic() + 20
        while not (tmp_path / "done").exists():  # as the orchestrator's watcher does
            assert time.monotonic() < deadline, "the rewrites to go on and end"
            if quota.due([sidecar.pid], time.monotonic()):
                assert quota.measure().problem == ""
                walks += 1
            time.sleep(0.05)
        assert walks >= 1
    finally:
        quota.close()
        sidecar.kill()
        sidecar.wait()


# -- the tree the orchestrator hands to the plugin's uid ------------------------------------------


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_handing_a_tree_over_follows_no_symlink_and_takes_any_depth(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("host")
    (data / "escape").symlink_to(outside)
    fd = os.open(data, os.O_RDONLY)
    for _ in range(1500):  # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    try:
        _own_tree(data, 3100999)
        assert os.lstat(data / "escape").st_uid == 3100999
        assert outside.stat().st_uid == 0
        assert os.lstat(data / "d" / "d" / "d").st_uid == 3100999
    finally:  # too deep for shutil.rmtree (pytest's clean-up) on Python 3.11
        subprocess.run(["rm", "-rf", str(data)], check=True)


# -- the ext4 image -------------------------------------------------------------------------------


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, Path]:
    """(image, data dir) paths of one plugin."""
    data = tmp_path / "state" / "data" / "p"
    data.mkdir(parents=True)
    return tmp_path / "state" / "images" / "p.ext4", data


def _fill(path: Path, megabytes: int) -> tuple[int, int | None]:
    """MiB written to ``path`` until a write failed, and its errno."""
    written = 0
    try:
        with open(path, "wb") as out:
            for _ in range(megabytes):
                out.write(b"\1" * MIB)
                out.flush()
                written += 1
    except OSError as exc:
        return written, exc.errno
    return written, None


def _loops(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout


@needs_images
def test_an_image_holds_the_quota_and_refuses_more(volume: tuple[Path, Path]) -> None:
    image, data = volume
    opened = DataImage.open(image, data, 16 * MIB, 3100999)
    try:
        assert _mounted_at(data) and os.stat(data).st_uid == 3100999
        assert 16 * MIB <= opened.capacity() < 16 * MIB + 256 * 1024
        assert capacity_of(image) == opened.capacity()
        assert opened.measure().problem == ""
        written, error = _fill(data / "fill", 40)
        assert error == errno.ENOSPC and 15 <= written <= 16
        assert "data dir quota (16 MiB) full" in opened.measure().problem
        assert image.stat().st_blocks * 512 <= 21 * MIB
        (data / "fill").unlink()
        assert opened.measure().problem == ""  # the episode is over
    finally:
        opened.close()
    opened.close()  # twice is fine
    assert not _mounted_at(data) and _loops(image) == ""


@needs_images
def test_a_second_mesh_may_not_mount_it_and_a_dead_one_leaves_nothing_behind(
    volume: tuple[Path, Path],
) -> None:
    image, data = volume
    first = DataImage.open(image, data, 8 * MIB, 0)
    (data / "kept").write_text("yes")
    with pytest.raises(sandbox.QuotaError, match="in use by another running mesh"):
        DataImage.open(image, data, 8 * MIB, 0)
    assert first._lock is not None  # the mesh dies: its lock goes, its mount stays
    os.close(first._lock)
    first._lock, first._mounted = None, False
    assert _mounted_at(data)
    second = DataImage.open(image, data, 8 * MIB, 0)
    try:
        assert any("removed a stale mount" in note for note in second.notes), second.notes
        assert (data / "kept").read_text() == "yes"
        assert len(_loops(image).splitlines()) == 1
    finally:
        second.close()
    assert not _mounted_at(data) and _loops(image) == ""


@needs_images
def test_a_plain_data_dir_moves_into_a_new_image_or_is_refused(volume: tuple[Path, Path]) -> None:
    image, data = volume
    (data / "notes").mkdir()
    (data / "notes" / "a.txt").write_text("a")
    os.link(data / "notes" / "a.txt", data / "hard")
    (data / "link").symlink_to("/etc/passwd")
    moved = DataImage.open(image, data, 8 * MIB, 0)
    try:
        assert (data / "notes" / "a.txt").read_text() == "a"
        assert os.stat(data / "hard").st_ino == os.stat(data / "notes" / "a.txt").st_ino
        assert os.readlink(data / "link") == "/etc/passwd"
    finally:
        moved.close()
    assert os.listdir(data) == [] and sorted(os.listdir(image.parent)) == ["p.ext4", "p.lock"]

    big = data.parent / "big"
    big.mkdir()
    _write(big / "x.bin", 10)
    with pytest.raises(sandbox.QuotaError, match=r"it holds 10.0 MiB in 1 files"):
        DataImage.open(image.with_name("big.ext4"), big, 8 * MIB, 0)
    assert os.listdir(big) == ["x.bin"] and not image.with_name("big.ext4").exists()


@needs_images
def test_an_interrupted_move_is_undone(volume: tuple[Path, Path]) -> None:
    """The plain dir was moved aside but the image not yet committed: it comes back."""
    image, data = volume
    image.parent.mkdir()
    aside = image.with_suffix(".old")
    data.rename(aside)
    data.mkdir()
    (aside / "f").write_text("back")
    image.with_suffix(".new").write_bytes(b"half made")
    opened = DataImage.open(image, data, 8 * MIB, 0)
    try:
        assert (data / "f").read_text() == "back" and _mounted_at(data)
        assert not aside.exists() and not image.with_suffix(".new").exists()
    finally:
        opened.close()


@needs_images
def test_an_image_grows_and_shrinks_with_its_quota_but_never_below_its_data(
    volume: tuple[Path, Path],
) -> None:
    image, data = volume
    DataImage.open(image, data, 16 * MIB, 0).close()
    grown = DataImage.open(image, data, 48 * MIB, 0)
    try:
        assert 48 * MIB <= grown.capacity() < 48 * MIB + 256 * 1024
        assert grown.notes == ["resized its data image from 16 MiB to 48 MiB"]
        _write(data / "x.bin", 20)
    finally:
        grown.close()
    with pytest.raises(sandbox.QuotaError, match="does not fit its new data quota of 16 MiB"):
        DataImage.open(image, data, 16 * MIB, 0)
    assert not _mounted_at(data) and _loops(image) == ""
    shrunk = DataImage.open(image, data, 24 * MIB, 0)
    try:
        assert 24 * MIB <= shrunk.capacity() < 24 * MIB + 256 * 1024
        assert (data / "x.bin").stat().st_size == 20 * MIB
    finally:
        shrunk.close()


@needs_images
def test_an_image_and_a_plain_dir_with_files_are_refused_together(
    volume: tuple[Path, Path],
) -> None:
    image, data = volume
    DataImage.open(image, data, 8 * MIB, 0).close()
    (data / "written-without-the-image").touch()
    with pytest.raises(sandbox.QuotaError, match="holds files, and the plugin's data image"):
        DataImage.open(image, data, 8 * MIB, 0)


# -- the policy and the launch --------------------------------------------------------------------


FULL = sandbox.HostSupport(
    root=True, bwrap="/usr/bin/bwrap", bwrap_why="", seccomp_why="", landlock_abi=6,
    landlock_why="", cgroup_why="", data_image_why="",
)  # fmt: skip
LIMITS = sandbox.ResourceLimits(memory_mb=128, cpu_seconds=5, max_processes=32, max_open_files=64,
                        max_file_size_mb=2, data_quota_mb=16)  # fmt: skip


def _request(tmp_path: Path) -> sandbox.SandboxRequest:
    return sandbox.SandboxRequest(
        plugin="p", plugin_dir=tmp_path / "plugin", data_dir=tmp_path / "data", limits=LIMITS,
        data_image=tmp_path / "images" / "p.ext4",
    )  # fmt: skip


def test_the_filesystem_layer_names_the_quota_and_how_it_holds(tmp_path: Path) -> None:
    image = sandbox.policy(_request(tmp_path), FULL, 61000)
    assert image.data_quota == sandbox.IMAGE
    detail = next(layer.detail for layer in image.layers if layer.name == "filesystem")
    assert "data dir quota 16 MiB, 2048 files (ext4 image: writes past it fail with ENOSPC)" in (
        detail
    )
    host = replace(FULL, root=False, data_image_why="the orchestrator is not root")
    accounted = sandbox.policy(_request(tmp_path), host, None)
    assert accounted.data_quota == sandbox.ACCOUNTED
    detail = next(layer.detail for layer in accounted.layers if layer.name == "filesystem")
    assert (
        "data dir quota 16 MiB, 2048 files (accounted, read-only while over; no ext4 image: "
        "the orchestrator is not root)" in detail
    ), detail


def test_a_read_only_data_dir_is_bound_and_landlocked_read_only(tmp_path: Path) -> None:
    for d in ("plugin", "data", "run/r0"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "run" / "mesh.sock").touch()
    host = replace(FULL, root=False, data_image_why="not root", cgroup_why="off in unit tests")
    policy = sandbox.policy(_request(tmp_path), host, None)
    data = str(tmp_path / "data")
    for read_only in (False, True):
        prepared = sandbox.prepare(
            policy, host, ["plugin"], replica=0, replica_dir=tmp_path / "run" / "r0",
            mesh_socket=tmp_path / "run" / "mesh.sock", runtime_paths=[Path(sys.prefix)],
            data_read_only=read_only,
        )  # fmt: skip
        try:
            argv = prepared.argv
            bind = argv[argv.index(data) - 2]
            landlock = argv[argv.index(data, argv.index(str(_LANDLOCK_EXEC))) - 1]
            assert (bind, landlock) == (
                ("--ro-bind-fd", "--ro") if read_only else ("--bind-fd", "--rw")
            )
            assert prepared.data_read_only is read_only
        finally:
            prepared.release()


@pytest.mark.skipif(not sandbox.probe().seccomp, reason="needs libseccomp")
def test_an_accounted_sandbox_refuses_fallocate_and_posix_fallocate_writes_instead(
    tmp_path: Path,
) -> None:
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"fd = os.open({str(tmp_path / 'f')!r}, os.O_CREAT | os.O_WRONLY)\n"
        "r = libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(1 << 20))\n"
        "print(r, ctypes.get_errno())\nos.posix_fallocate(fd, 0, 1 << 20)\n"
    )
    fd = filter_fd(no_fallocate=True)
    try:
        out = subprocess.run(
            ["bwrap", "--dev-bind", "/", "/", "--seccomp", str(fd), sys.executable, "-c", code],
            capture_output=True, text=True, timeout=30, pass_fds=(fd,),
        )  # fmt: skip
    finally:
        os.close(fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-1", str(errno.EOPNOTSUPP)]
    assert (tmp_path / "f").stat().st_blocks * 512 >= 1 << 20  # written, so counted
