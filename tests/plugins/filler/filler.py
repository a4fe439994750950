"""Test plugin: fills its data dir past its quota, in every way a plugin can.

Every loop is bounded by its arguments (megabytes, a file count, a depth), so
the plugin cannot run away even where no quota holds it. The tools are plain
functions: the SDK runs them in a worker thread, so the sidecar keeps
answering health checks while they write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from plugins_sdk import Plugin

app = Plugin()  # named by its plugin.yaml

MIB = 1 << 20
CHUNK = b"\xa5" * MIB


def _data() -> Path:
    return Path(os.environ["SIDEMESH_DATA_DIR"])


def _error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


@app.tool()
def fill(
    megabytes: Annotated[int, Field(ge=1, le=4096)],
    file_mb: Annotated[int, Field(ge=1, le=64)] = 4,
    prefix: str = "fill",
) -> dict[str, Any]:
    """Writes ``megabytes`` MiB in files of ``file_mb`` MiB, until a write fails."""
    written = files = 0
    error = None
    try:
        while written < megabytes:
            with open(_data() / f"{prefix}-{files}.bin", "wb") as out:
                files += 1
                for _ in range(min(file_mb, megabytes - written)):
                    out.write(CHUNK)
                    written += 1
                out.flush()
    except OSError as exc:
        error = _error(exc)
    return {"written_mb": written, "files": files, "error": error}


@app.tool()
def allocate(
    megabytes: Annotated[int, Field(ge=1, le=4096)],
    file_mb: Annotated[int, Field(ge=1, le=64)] = 4,
) -> dict[str, Any]:
    """Reserves ``megabytes`` MiB with fallocate(2), which writes nothing, in ``file_mb`` files.

    Reports what the raw system call said, and what posix_fallocate (which glibc
    falls back to writing for) then managed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    raw = None
    allocated = files = 0
    error = None
    try:
        while allocated < megabytes:
            size = min(file_mb, megabytes - allocated) * MIB
            fd = os.open(_data() / f"alloc-{files}.bin", os.O_CREAT | os.O_WRONLY, 0o600)
            files += 1
            try:
                if raw is None:
                    done = libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(size))
                    raw = "ok" if done == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            allocated += size // MIB
    except OSError as exc:
        error = _error(exc)
    return {"raw_fallocate": raw, "allocated_mb": allocated, "files": files, "error": error}


@app.tool()
def write(name: str, text: str) -> dict[str, Any]:
    """Writes ``text`` to ``name`` in the data dir."""
    try:
        (_data() / name).write_text(text)
    except OSError as exc:
        return {"ok": False, "error": _error(exc)}
    return {"ok": True, "error": None}


@app.tool(read_only=True)
def read(name: str) -> dict[str, Any]:
    """Reads ``name`` from the data dir."""
    try:
        text = (_data() / name).read_text()
    except OSError as exc:
        return {"ok": False, "text": None, "error": _error(exc)}
    return {"ok": True, "text": text, "error": None}


@app.tool()
def remove(prefix: str) -> dict[str, Any]:
    """Removes the entries of the data dir whose names start with ``prefix``."""
    removed = 0
    error = None
    for entry in _data().iterdir():
        if entry.name.startswith(prefix):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except OSError as exc:
                error = _error(exc)
    return {"removed": removed, "error": error}


@app.tool()
def many(
    count: Annotated[int, Field(ge=1, le=200_000)], directories: bool = False
) -> dict[str, Any]:
    """Makes ``count`` empty files (or directories) in ``many/``."""
    made = 0
    error = None
    try:
        (_data() / "many").mkdir(exist_ok=True)
        for i in range(count):
            path = _data() / "many" / f"{i}"
            if directories:
                path.mkdir()
            else:
                path.touch()
            made += 1
    except OSError as exc:
        error = _error(exc)
    return {"made": made, "error": error}


@app.tool()
def deep(levels: Annotated[int, Field(ge=1, le=5000)], megabytes: int = 0) -> dict[str, Any]:
    """Nests ``levels`` directories under ``deep/`` and writes ``megabytes`` MiB at the bottom."""
    made = written = 0
    error = None
    fd = os.open(_data(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir("deep", dir_fd=fd)
        for _ in range(levels):
            child = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            os.mkdir("deep", dir_fd=fd)
            made += 1
        out = os.open("bottom.bin", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)
        try:
            for _ in range(megabytes):
                os.write(out, CHUNK)
                written += 1
        finally:
            os.close(out)
    except OSError as exc:
        error = _error(exc)
    finally:
        os.close(fd)
    return {"levels": made, "written_mb": written, "error": error}


@app.tool()
def links(count: Annotated[int, Field(ge=1, le=10_000)]) -> dict[str, Any]:
    """Writes one 4 MiB file and ``count`` hard links to it."""
    target = _data() / "linked.bin"
    made = 0
    error = None
    try:
        with open(target, "wb") as out:
            for _ in range(4):
                out.write(CHUNK)
        for i in range(count):
            os.link(target, _data() / f"link-{i}")
            made += 1
    except OSError as exc:
        error = _error(exc)
    return {"links": made, "error": error}


@app.tool()
def hide(megabytes: Annotated[int, Field(ge=1, le=4096)]) -> dict[str, Any]:
    """Writes ``megabytes`` MiB in ``hidden/``, then takes every permission away from it;
    and points a symlink at a big host file, to be counted instead of it."""
    hidden = _data() / "hidden"
    written = 0
    error = None
    try:
        hidden.mkdir(exist_ok=True)
        while written < megabytes:
            with open(hidden / f"{written}.bin", "wb") as out:
                for _ in range(min(4, megabytes - written)):
                    out.write(CHUNK)
                    written += 1
    except OSError as exc:
        error = _error(exc)
    with contextlib.suppress(OSError):
        os.symlink(os.path.realpath(os.__file__), _data() / "big-link")
    hidden.chmod(0)
    return {"written_mb": written, "error": error}


@app.tool(read_only=True)
def usage() -> dict[str, Any]:
    """What the data dir's filesystem says about its room."""
    st = os.statvfs(_data())
    return {
        "free_mb": st.f_bavail * st.f_frsize / MIB,
        "size_mb": st.f_blocks * st.f_frsize / MIB,
        "entries": sorted(os.listdir(_data()))[:50],
    }
