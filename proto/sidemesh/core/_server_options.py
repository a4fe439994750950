"""The gRPC server settings every Sidemesh process serves with (orchestrator and sidecars)."""

from __future__ import annotations

from typing import Any


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options for ``grpc.aio.server``.

    gRPC core cancels new calls that arrive faster than a Python server takes
    them (by default past 1,000 waiting): a burst of clients would see
    ``CANCELLED`` for calls nobody cancelled. The limits are raised far above
    any real burst; the mesh's own admission control (``RESOURCE_EXHAUSTED``)
    decides instead.
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.server.max_pending_requests", 1_000_000),
        ("grpc.server.max_pending_requests_hard_limit", 2_000_000),
    ]
