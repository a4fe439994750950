"""A sidecar's operating-system process: spawn, log forwarding, exit, and no orphans."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator._output import LineBudget, OutputLimits, clean_line
from sidemesh.core import Child, spawn

log = logging.getLogger("sidemesh.process")

_STDERR_TAIL_LINES = 30
_LEVELS = {
    name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
}
_MAX_LINE = 8192
#: Bytes of a sidecar's output read at a time.
_CHUNK = 65536

#: Prefix that makes the kernel SIGKILL the child when the orchestrator dies,
#: however it dies (PR_SET_PDEATHSIG, via util-linux's setpriv).
_SETPRIV = shutil.which("setpriv")


def describe_exit(returncode: int | None) -> str:
    """``exit code 1``, ``killed by SIGKILL``, or ``running``."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a sandboxed sidecar runs a few levels down)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:
            continue
    return tree


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in bytes (0 when unknown)."""
    total = 0
    for member in process_tree(pid) if pid else ():
        try:
            with open(f"/proc/{member}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


class SidecarProcess:
    """One running sidecar. Its stdout/stderr lines go to the log, tagged with its name.

    It is started with ``posix_spawn``, never ``fork()`` (see :mod:`sidemesh.core`'s
    ``spawn``): the orchestrator runs gRPC's threads.
    """

    def __init__(
        self,
        child: Child,
        tag: str,
        streams: list[asyncio.StreamReader],
        output: OutputLimits,
    ) -> None:
        self._child = child
        self.tag = tag
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._logger = logging.getLogger(f"plugin.{tag}")
        self._limits = output
        #: The output's rate limit, shared by stdout and stderr; counts what it dropped.
        self.budget = LineBudget(output)
        stdout, stderr = streams
        self._pumps = [
            asyncio.create_task(self._pump(stdout, logging.INFO, keep=False)),
            asyncio.create_task(self._pump(stderr, logging.INFO, keep=True)),
        ]
        self._exited = asyncio.create_task(self._wait())

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        tag: str,
        die_with_parent: bool = True,
        pass_fds: tuple[int, ...] = (),
        output: OutputLimits | None = None,
    ) -> SidecarProcess:
        """Starts ``argv`` in its own session, with exactly ``env`` as its environment.

        With ``die_with_parent`` the process is killed by the kernel if the
        orchestrator dies (a launcher that does this itself, such as bubblewrap's
        ``--die-with-parent``, passes False).
        """
        command = list(argv)
        if die_with_parent:
            if _SETPRIV is None:
                raise RuntimeError(
                    "setpriv (util-linux) is missing: it keeps sidecars from outliving the "
                    "orchestrator; install util-linux"
                )
            command = [_SETPRIV, "--pdeathsig", "KILL", "--", *command]
        child = spawn(command, env=env, cwd=cwd, pass_fds=pass_fds)
        child.watch()
        assert child.stdout is not None and child.stderr is not None
        streams = [await _reader(fd) for fd in (child.stdout, child.stderr)]
        return cls(child, tag, streams, output or OutputLimits())

    @property
    def pid(self) -> int:
        """The host process id."""
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while running."""
        return self._child.returncode

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr."""
        return "\n".join(self._stderr_tail)

    async def wait(self) -> int:
        """Waits for the process to exit (and its output to be logged); returns its status."""
        return await asyncio.shield(self._exited)

    async def _wait(self) -> int:
        code = await self._child.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._pumps), 2.0)
        return code

    def kill_group(self, sig: signal.Signals) -> None:
        """Sends ``sig`` to the process and everything in its session."""
        self._child.send_signal_to_group(sig)

    async def terminate(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self._child.returncode is None:
            self.kill_group(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self.wait(), grace)
            except TimeoutError:
                self.kill_group(signal.SIGKILL)
        return await self.wait()

    async def _pump(self, stream: asyncio.StreamReader, level: int, *, keep: bool) -> None:
        """Logs each line of ``stream``: escaped, cut to length, within the rate limit."""
        pending = b""
        limit = self._limits.max_line_bytes
        while True:
            chunk = await stream.read(_CHUNK)
            if not chunk:
                if pending:
                    self._line(pending, level, keep)
                self._report_drops()
                return
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            if len(pending) > limit:  # a line without end: log what there is, cut
                lines.append(pending)
                pending = b""
            for index, raw in enumerate(lines):
                if not self._line(raw, level, keep):
                    self.budget.drop(len(lines) - index - 1)  # over the rate: skip the rest
                    break
            self._report_drops()

    def _line(self, raw: bytes, level: int, keep: bool) -> bool:
        """Logs one line; False when the rate limit dropped it."""
        if not raw.strip():
            return True
        if not self.budget.admit():
            return False
        line = clean_line(raw.rstrip(b"\r"), self._limits.max_line_bytes)
        if keep:
            self._stderr_tail.append(line)
        # Sidecars log "LEVEL logger: message"; keep their level.
        word, _, rest = line.partition(" ")
        line_level = _LEVELS.get(word)
        if line_level is not None and rest:
            self._logger.log(line_level, "%s", rest)
        else:
            self._logger.log(level, "%s", line)
        return True

    def _report_drops(self) -> None:
        dropped = self.budget.report()
        if dropped:
            self._logger.warning(
                "dropped %d lines of its output (over %g lines/s; %d dropped since it started)",
                dropped, self._limits.lines_per_second, self.budget.dropped,
            )  # fmt: skip


async def _reader(fd: int) -> asyncio.StreamReader:
    """An asyncio stream reading the pipe ``fd`` (which it then owns)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_LINE * 4)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader
