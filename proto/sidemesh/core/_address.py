"""Mesh addresses: ``host:port`` for TCP, ``unix:/path`` for a Unix socket."""

from __future__ import annotations

import os

#: Where ``sidemesh serve`` listens on TCP by default (loopback only).
DEFAULT_TCP_ADDRESS = "127.0.0.1:50051"

#: Longest Unix socket path the kernel accepts (``sun_path`` is 108 bytes with its NUL).
MAX_UNIX_SOCKET_PATH = 107


def normalize_address(address: str) -> str:
    """Returns ``address`` in the form gRPC expects.

    Accepts ``host:port``, ``[::1]:port``, ``unix:/abs/path``, ``unix:///abs/path``,
    ``unix:relative/path`` and a bare absolute socket path. Raises ``ValueError``
    with the fix when the address cannot be used.
    """
    address = address.strip()
    if not address:
        raise ValueError("empty address: use host:port or unix:/path/to/socket")
    if address.startswith("/"):
        address = "unix:" + address
    if address.startswith("unix://"):
        address = "unix:" + address[len("unix://") :]
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError(f"{address!r} has no socket path: use unix:/path/to/socket")
        if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path is {len(os.fsencode(path))} bytes, longer than the "
                f"kernel's limit of {MAX_UNIX_SOCKET_PATH}: {path!r}; choose a shorter path"
            )
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not host:port or unix:/path/to/socket")
    return address


def unix_socket_path(address: str) -> str | None:
    """The socket path of a ``unix:`` address, or ``None`` for TCP."""
    address = normalize_address(address)
    return address[len("unix:") :] if address.startswith("unix:") else None
