"""How a benchmark client reaches a topology: its address and the credentials it shows.

The direct, nginx and ``auth: {mode: off}`` orchestrator topologies take plain
HTTP/2 without credentials; the authenticated orchestrators take a bearer
token (``authorization`` metadata) or a client certificate (mTLS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

#: Options of every benchmark channel: no transparent retries hiding a failure.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]


@dataclass(frozen=True)
class Tls:
    """The files of a client certificate and the CA that signed the server's."""

    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials presenting the client certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


@dataclass(frozen=True)
class Dial:
    """``address`` (host:port) and what a call must carry to be let in."""

    address: str
    #: A bearer token sent as ``authorization: Bearer TOKEN`` on every call.
    token: str | None = None
    tls: Tls | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call sends."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def aio_channel(self) -> grpc.aio.Channel:
        """A new ``grpc.aio`` channel to the topology."""
        if self.tls is not None:
            return grpc.aio.secure_channel(
                self.address, self.tls.credentials(), options=CHANNEL_OPTIONS
            )
        return grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def channel(self) -> grpc.Channel:
        """A new blocking channel to the topology."""
        if self.tls is not None:
            return grpc.secure_channel(
                self.address, self.tls.credentials(), options=CHANNEL_OPTIONS
            )
        return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def h2load_headers(self) -> list[str]:
        """Extra ``--header`` values for h2load (it cannot present a client certificate)."""
        return [f"authorization: Bearer {self.token}"] if self.token else []
