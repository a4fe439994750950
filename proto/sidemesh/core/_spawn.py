"""Starting a child process without ``fork()``: ``posix_spawn``, and its exit on the event loop.

A process that has loaded gRPC must not ``fork()``. gRPC core registers
``pthread_atfork`` handlers; when another thread is inside gRPC at that moment
it logs "Other threads are currently calling into gRPC, skipping fork()
handlers", and the child, a copy of a process whose gRPC threads are gone,
can crash before it reaches ``exec`` (sidecars were seen dying "killed by
SIGSEGV" right after launch under load). asyncio's and uvloop's subprocess
support both ``fork()``. glibc's ``posix_spawn`` does not: it starts the child
with ``clone(CLONE_VM | CLONE_VFORK)`` and runs no fork handlers, so nothing of
the parent's state is copied or touched before ``exec``.

:func:`spawn` is that, with what a supervisor needs: pipes for the child's
output, inherited descriptors, a new session, default signal dispositions,
and every other descriptor closed. :class:`Child` waits for the exit through a
pidfd on the running event loop (no child watcher, no ``SIGCHLD`` handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Signals Python ignores (``SIG_IGN`` survives ``exec``): the child gets their defaults.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU, signal.SIGINT)
#: ``env --chdir`` starts the command in its working directory (posix_spawn has no chdir
#: in Python); it ``exec``s the command, so the pid is the same.
_ENV = shutil.which("env") or "/usr/bin/env"


class Child:
    """A spawned process: its pid, the read ends of its output pipes, and its exit."""

    def __init__(self, pid: int, stdout: int | None, stderr: int | None) -> None:
        self.pid = pid
        #: Read ends of the child's stdout and stderr pipes (the caller owns them).
        self.stdout = stdout
        self.stderr = stderr
        #: The exit status (negative: killed by that signal), or None while it runs.
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] | None = None
        self._pidfd: int | None = None

    def watch(self) -> None:
        """Starts watching for the exit on the running loop (once, right after the spawn)."""
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # pragma: no cover - a pid is ours until we reap it
            self._reap()
            return
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: the status is lost
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return  # not exited yet (a spurious wakeup)
        self.returncode = os.waitstatus_to_exitcode(status)
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        """Waits for the process to exit; returns its status."""
        assert self._exited is not None, "call watch() first"
        return await asyncio.shield(self._exited)

    def send_signal_to_group(self, sig: signal.Signals) -> None:
        """Sends ``sig`` to the child's process group (its session), if it still runs."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | str | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = True,
    capture: bool = True,
) -> Child:
    """Starts ``argv`` with exactly ``env``, stdin from ``/dev/null``, without ``fork()``.

    With ``capture`` the child's stdout and stderr are pipes whose read ends
    are :attr:`Child.stdout` and :attr:`Child.stderr`; otherwise they are the
    caller's. ``pass_fds`` are inherited at the same numbers; every other
    descriptor the caller holds is closed in the child. Raises ``OSError`` when
    the program cannot be executed. Call :meth:`Child.watch` on the event loop
    that should see its exit.
    """
    argv = list(argv)
    if cwd is not None:
        argv = [_ENV, f"--chdir={cwd}", "--", *argv]
    program = argv[0]
    if "/" not in program:
        found = shutil.which(program, path=env.get("PATH"))
        if found is None:
            raise FileNotFoundError(f"{program!r} is not on PATH ({env.get('PATH', '')})")
        program = found
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    out_r = out_w = err_r = err_w = None
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, devnull, 0)]
    try:
        if capture:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            actions += [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        keep = {0, 1, 2, *pass_fds}
        for passed in pass_fds:
            os.set_inheritable(passed, True)
        actions += [(os.POSIX_SPAWN_CLOSE, n) for n in _inheritable_fds() if n not in keep]
        pid = os.posix_spawn(
            program, argv, dict(env), file_actions=actions, setsid=new_session,
            setsigmask=(), setsigdef=_RESET_SIGNALS,
        )  # fmt: skip
    except BaseException:
        for end in (out_r, err_r):
            if end is not None:
                os.close(end)
        raise
    finally:
        os.close(devnull)
        for end in (out_w, err_w):
            if end is not None:
                os.close(end)
    return Child(pid, out_r, err_r)


def _inheritable_fds() -> list[int]:
    """Descriptors of this process that a spawned child would inherit (no ``FD_CLOEXEC``)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:  # the listing's own descriptor, already closed
            continue
        if not flags & fcntl.FD_CLOEXEC:
            fds.append(fd)
    return fds
