"""How a client proves who it is to the mesh: a bearer token, TLS, a client certificate.

Where each comes from, first found wins:

- **token**: ``token=``, ``token_file=``, ``$SIDEMESH_TOKEN``,
  ``$SIDEMESH_TOKEN_FILE``; else, when the address is the TCP address of a mesh
  running from the state dir (its ``endpoints.json``; default
  ``$XDG_STATE_HOME/sidemesh``), that mesh's owner token, ``<state_dir>/token``
  (as Jupyter's clients find their server's token). A Unix socket needs no
  token: the mesh knows the peer's uid.
- **TLS**: ``tls=`` (a :class:`TlsOptions`, ``True`` for the system's CAs,
  ``False`` for none); else ``$SIDEMESH_TLS_CA``, ``$SIDEMESH_TLS_CERT`` and
  ``$SIDEMESH_TLS_KEY`` for a TCP address; else plaintext.

Over TLS the token travels as gRPC call credentials
(``access_token_call_credentials``); without TLS (loopback TCP, Unix socket),
where grpc refuses call credentials, as ``authorization: Bearer …`` metadata.
A token is never sent in clear to another host: that is refused here.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sidemesh.core import TOKEN_ENV, TOKEN_FILE, TOKEN_FILE_ENV, default_state_dir, running_mesh

TLS_CA_ENV = "SIDEMESH_TLS_CA"
TLS_CERT_ENV = "SIDEMESH_TLS_CERT"
TLS_KEY_ENV = "SIDEMESH_TLS_KEY"
_TLS_ENVS = (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the mesh: PEM file paths. ``ca`` signs the mesh's certificate (default: the
    system's trusted CAs); ``cert`` and ``key`` are this client's certificate for mTLS;
    ``server_name`` overrides the name checked against the mesh's certificate."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS client certificate needs its key, and a key its certificate")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """grpc's SSL credentials, reading the files now."""
        return grpc.ssl_channel_credentials(
            _read(self.ca, "TLS CA"), _read(self.key, "TLS key"), _read(self.cert, "TLS cert")
        )


@dataclass(frozen=True)
class Credentials:
    """What one client sends: a token (and where it came from) and TLS settings."""

    token: str | None = None
    #: Where the token came from, for messages: ``$SIDEMESH_TOKEN``, ``token_file /p``, …
    token_source: str = ""
    tls: TlsOptions | None = None

    def describe(self) -> str:
        """In words: ``a bearer token from $SIDEMESH_TOKEN, over TLS with a client certificate``."""
        parts = [f"a bearer token from {self.token_source}" if self.token else "no token"]
        if self.tls is None:
            parts.append("over plaintext")
        else:
            parts.append("over TLS" + (" with a client certificate" if self.tls.cert else ""))
        return ", ".join(parts)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the token, when there is no TLS to carry it."""
        if self.token and self.tls is None:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS (with the token as call credentials), or None for a plaintext channel."""
        if self.tls is None:
            return None
        credentials = self.tls.channel_credentials()
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return credentials

    def channel(
        self,
        address: str,
        options: Sequence[tuple[str, Any]],
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None,
    ) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to ``address`` with these credentials."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        if self.tls is not None and self.tls.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.tls.server_name)]
        return grpc.aio.secure_channel(
            address, credentials, options=options, interceptors=interceptors
        )


def resolve_credentials(
    address: str,
    *,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    tls: TlsOptions | bool | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> Credentials:
    """The credentials for ``address`` (normalized), from the arguments, the environment or the
    mesh running from ``state_dir``; raises ``ValueError`` with the fix."""
    tcp = not address.startswith("unix:")
    options: TlsOptions | None
    if isinstance(tls, TlsOptions):
        options = tls
    elif tls is True:
        options = TlsOptions()
    elif tls is None and tcp and any(os.environ.get(v) for v in _TLS_ENVS):
        options = TlsOptions(
            os.environ.get(TLS_CA_ENV) or None,
            os.environ.get(TLS_CERT_ENV) or None,
            os.environ.get(TLS_KEY_ENV) or None,
        )
    else:
        options = None
    value, source = _token(address, token, token_file, state_dir)
    if value and tcp and options is None and not _loopback(address):
        raise ValueError(
            f"refusing to send a bearer token ({source}) in clear to {address}: connect with "
            f"TLS (tls=TlsOptions(ca=...), --tls-ca or ${TLS_CA_ENV}) or to a loopback address"
        )
    return Credentials(value, source, options)


def _token(
    address: str,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
    state_dir: str | os.PathLike[str] | None,
) -> tuple[str | None, str]:
    if token:
        return token.strip(), "token="
    if token_file is not None:
        return _read_token(Path(token_file), f"token_file {token_file}"), f"token_file {token_file}"
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_FILE_ENV):
        env_path = os.environ[TOKEN_FILE_ENV]
        source = f"${TOKEN_FILE_ENV} ({env_path})"
        return _read_token(Path(env_path), f"${TOKEN_FILE_ENV}"), source
    if address.startswith("unix:"):
        return None, ""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    if not _serves(directory, address):
        return None, ""
    path = directory / TOKEN_FILE
    try:
        value = path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, IndexError):
        return None, ""
    return value or None, f"the mesh's token file {path}"


def _read_token(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file of {what}: {exc.strerror}") from None
    if not text:
        raise ValueError(f"the token file of {what} is empty")
    return text.splitlines()[0].strip()


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def _serves(state_dir: Path, address: str) -> bool:
    """True when the mesh running from ``state_dir`` listens on TCP ``address``."""
    mesh = running_mesh(state_dir)
    if mesh is None:
        return False
    host, port = _split(address)
    for bound in mesh["addresses"]:
        if bound.startswith("unix:"):
            continue
        bound_host, bound_port = _split(bound)
        if bound_port != port:
            continue
        if bound_host == host or (_is_loopback_host(host) and (
            _is_loopback_host(bound_host) or bound_host in ("0.0.0.0", "::")
        )):  # fmt: skip
            return True
    return False


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def _loopback(address: str) -> bool:
    return _is_loopback_host(_split(address)[0])


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
