"""A replica's socket as the orchestrator dials it: never through a path the plugin can change.

A sidecar makes its socket in a directory it can write (it must, to bind
there). If the orchestrator dialled that path, a plugin could swap its socket
for a symlink to another plugin's socket, or to any Unix socket on the host,
and the orchestrator (root, perhaps) would follow it on its next reconnect.
So the socket is opened once, without following links (``O_PATH |
O_NOFOLLOW``), checked to be a socket owned by the plugin, and dialled from
then on as ``/proc/self/fd/N``: that names the inode the sidecar bound, not
the path. Once connected, the listener's peer credentials must belong to a
process of the replica itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from pathlib import Path

from orchestrator._process import process_tree


class SocketRefused(Exception):
    """The replica's socket is not one the orchestrator may dial; the message says why."""


class PinnedSocket:
    """An open handle on a replica's socket inode; ``address`` dials exactly that inode."""

    def __init__(self, path: Path, owner: int | None) -> None:
        """Opens ``path`` without following it; raises :class:`SocketRefused`.

        ``owner``: the uid the socket file must belong to (the plugin's), if known.
        """
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SocketRefused(f"cannot open {path}: {exc.strerror}") from None
        info = os.fstat(self._fd)
        problem = ""
        if stat.S_ISLNK(info.st_mode):
            problem = "it is a symbolic link, not the socket the sidecar made"
        elif not stat.S_ISSOCK(info.st_mode):
            problem = "it is not a socket"
        elif owner is not None and info.st_uid != owner:
            problem = f"it belongs to uid {info.st_uid}, not the plugin's uid {owner}"
        if problem:
            self.close()
            raise SocketRefused(f"{path} was refused: {problem}")

    @property
    def address(self) -> str:
        """The gRPC address of the pinned inode (valid in this process only)."""
        assert self._fd is not None, "closed"
        return f"unix:/proc/self/fd/{self._fd}"

    def verify_listener(self, replica_pid: int) -> None:
        """Raises :class:`SocketRefused` unless a process of the replica listens on the socket."""
        assert self._fd is not None, "closed"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(f"/proc/self/fd/{self._fd}")
            except OSError as exc:
                raise SocketRefused(f"nobody listens on {self.path}: {exc.strerror}") from None
            raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
        if pid not in process_tree(replica_pid):
            raise SocketRefused(
                f"{self.path} is served by pid {pid} (uid {uid}), which is not a process of "
                f"this replica (pid {replica_pid})"
            )

    def close(self) -> None:
        """Releases the handle."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
