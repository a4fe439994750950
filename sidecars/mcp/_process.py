"""The MCP server's process: it cannot outlive the bridge, and its stderr becomes log lines.

- **No orphans.** The server is started through ``setpriv --pdeathsig KILL``,
  so the kernel kills it when the bridge dies, even by SIGKILL; it leads its
  own process group (``start_new_session``), which the bridge SIGKILLs when a
  session ends, so helpers the server started go too. In the sandbox the PID
  namespace also ends every process of the plugin with the sidecar.
- **Its environment** is the bridge's own (the scrubbed sidecar environment,
  which names the mesh in ``SIDEMESH_MESH``) plus the manifest's ``mcp.env``.
- **Its stderr** (and, for an HTTP server, its stdout) is read line by line and
  logged as ``INFO mcp-server: <line>``, so the orchestrator shows each line
  tagged with the plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import TextIO

from sidecars.mcp._spec import ServerSpec

#: The logger of the server's own output lines.
SERVER_LOG = logging.getLogger("mcp-server")
log = logging.getLogger("sidecars.mcp")

#: Longest line kept whole; longer ones are split.
_MAX_LINE = 1 << 20


class SpawnError(Exception):
    """The MCP server cannot be started at all (no such command); the message says why."""


def server_environment(spec: ServerSpec) -> dict[str, str]:
    """The server's environment: the bridge's, plus the manifest's ``mcp.env``."""
    return {**os.environ, **spec.env}


def server_argv(spec: ServerSpec, env: dict[str, str]) -> list[str]:
    """The argv that starts the server with PR_SET_PDEATHSIG=SIGKILL, via ``setpriv``.

    Raises ``SpawnError`` when the command is not on the server's ``PATH``
    (relative paths are looked up from the plugin's directory, the working
    directory).
    """
    command = spec.command
    if "/" not in command and shutil.which(command, path=env.get("PATH")) is None:
        raise SpawnError(
            f"the MCP server's command {command!r} is not on its PATH ({env.get('PATH', '')}): "
            "install it, or give its path in the manifest's 'mcp.command'"
        )
    if "/" in command and not os.access(command, os.X_OK):
        raise SpawnError(f"the MCP server's command {command!r} is not an executable file")
    setpriv = shutil.which("setpriv", path=env.get("PATH"))
    if setpriv is None:
        log.warning("setpriv not found: the MCP server will not be killed if the bridge dies")
        return [command, *spec.args]
    return [setpriv, "--pdeathsig", "KILL", "--", command, *spec.args]


def child_pids() -> set[int]:
    """The bridge's direct children, from ``/proc`` (empty where it cannot be read)."""
    pids: set[int] = set()
    for path in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(pid) for pid in path.read_text().split())
    return pids


def kill_group(pgid: int) -> None:
    """SIGKILLs process group ``pgid`` (the server and whatever it started), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class OutputPipe:
    """A pipe the server writes its stderr (and stdout) to; each line read becomes a log line.

    Give :attr:`writer` to the process, then call :meth:`start` once it is
    spawned: that closes the bridge's copy of the write end, so the reader sees
    the end of the output when the server and its children are gone.
    """

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self._read = os.fdopen(read_fd, "rb", buffering=0)
        #: The write end, for the child's stderr.
        self.writer: TextIO = os.fdopen(write_fd, "w")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Closes the bridge's write end and starts logging what the server writes."""
        self.writer.close()
        self._task = asyncio.create_task(self._pump(), name="mcp-server-stderr")

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_LINE)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self._read
        )
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line longer than the limit: log what there is
                    line = await reader.read(_MAX_LINE)
                if not line:
                    return
                text = line.decode(errors="replace").rstrip()
                if text:
                    SERVER_LOG.info("%s", text)
        finally:
            transport.close()

    async def close(self, timeout: float = 1.0) -> None:
        """Waits up to ``timeout`` for the last lines, then stops reading."""
        self.writer.close()
        task, self._task = self._task, None
        if task is None:
            self._read.close()
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
