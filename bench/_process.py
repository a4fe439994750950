"""A process the benchmark starts: its own log file, always stopped, never orphaned."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench._proc import process_tree

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], T | None], timeout: float, what: Callable[[], str]) -> T:
    """Polls ``predicate`` until it returns something; raises ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what()}")
        time.sleep(0.05)


class Process:
    """A child process with its output in ``log_path``.

    It gets SIGKILL if the benchmark dies (``setpriv --pdeathsig``), and
    :meth:`stop` ends it, and what it started, within a bounded time.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process's pid (``setpriv`` execs it, so this is the program's own pid)."""
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def start(self) -> None:
        """Starts the process."""
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                prefix + self.argv, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env, start_new_session=True,
            )  # fmt: skip

    def check_alive(self) -> None:
        """Raises ``RuntimeError`` with the log's tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the process's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signals the process, waits up to ``timeout`` s, then kills what is left of its tree."""
        if self.proc is None:
            return None
        tree = [(p, _start_time(p)) for p in process_tree(self.proc.pid)]
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid, started in tree[1:]:  # descendants that outlived it (e.g. nginx workers)
            if started is not None and _start_time(pid) == started:  # not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or ``None`` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])  # starttime, field 22
