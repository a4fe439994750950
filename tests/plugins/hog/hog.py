"""Test plugin: uses more of the machine than its manifest's limits allow.

Every loop is bounded by its arguments (megabytes, seconds, a child count),
so the plugin cannot run away even where no sandbox holds it. The tools are
plain functions: the SDK runs them in a worker thread, so the sidecar keeps
answering health checks while they work, and only a limit can stop it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from plugins_sdk import Plugin

app = Plugin()  # named by its plugin.yaml

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def _error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


@app.tool()
def allocate(megabytes: Annotated[int, Field(ge=1, le=4096)]) -> dict[str, Any]:
    """Allocates ``megabytes`` MiB in 1 MiB chunks, writing to every page of each."""
    chunks = []
    try:
        for _ in range(megabytes):
            chunk = bytearray(MIB)
            chunk[::PAGE] = b"\1" * len(range(0, MIB, PAGE))  # make the kernel back each page
            chunks.append(chunk)
    except MemoryError as exc:
        return {"ok": False, "allocated_mb": len(chunks), "error": _error(exc)}
    return {"ok": True, "allocated_mb": len(chunks), "error": None}


@app.tool()
def spin(seconds: Annotated[float, Field(gt=0, le=60)]) -> dict[str, Any]:
    """Burns CPU for ``seconds`` of wall time; reports the CPU time this process has used."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return {"ok": True, "loops": n, "process_cpu_seconds": time.process_time()}


@app.tool()
def fork_bomb(
    seconds: Annotated[float, Field(gt=0, le=30)],
    max_children: Annotated[int, Field(ge=1, le=512)] = 256,
) -> dict[str, Any]:
    """Forks sleeping children until fork fails, the time is up or ``max_children`` live.

    Every child is killed and reaped before the tool returns; a child left
    behind by a killed sidecar exits on its own when the time is up.
    """
    end = time.monotonic() + seconds
    children: list[int] = []
    error = None
    try:
        while len(children) < max_children and time.monotonic() < end:
            try:
                pid = os.fork()
            except OSError as exc:
                error = _error(exc)
                break
            if pid == 0:  # the child: sleep, then leave without running any cleanup
                try:
                    time.sleep(max(0.0, end - time.monotonic()))
                finally:
                    os._exit(0)
            children.append(pid)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return {"children": len(children), "error": error}


@app.tool()
def write_big(megabytes: Annotated[int, Field(ge=1, le=1024)]) -> dict[str, Any]:
    """Writes a file of ``megabytes`` MiB in ``$SIDEMESH_DATA_DIR``, 1 MiB at a time."""
    path = Path(os.environ["SIDEMESH_DATA_DIR"], "big.bin")
    written = 0
    chunk = b"\0" * MIB
    try:
        with path.open("wb") as f:
            for _ in range(megabytes):
                f.write(chunk)
                f.flush()
                written += 1
    except OSError as exc:
        return {"ok": False, "written_mb": written, "error": _error(exc), "path": str(path)}
    return {"ok": True, "written_mb": written, "error": None, "path": str(path)}
