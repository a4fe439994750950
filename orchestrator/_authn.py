"""Authentication: from a call's transport identity and metadata to a :class:`Principal`.

The data plane proves what it can about the peer (a :class:`TransportIdentity`:
Unix peer credentials, a plugin's callback socket, a TLS client certificate)
and passes the call's ``authorization`` metadata; this module decides who the
caller is, or refuses the call with ``UNAUTHENTICATED``::

    authenticator = Authenticator(config.auth, config.state_dir)
    principal = authenticator.authenticate(identity, metadata)  # or AuthenticationError

Rules, per listener, with ``auth.mode: on``:

- callback socket: always ``plugin:NAME``; a bearer token there is ignored.
- a bearer token (``authorization: Bearer …``), when present, names the caller
  (``token:NAME`` or ``jwt:SUB``). It is accepted over TLS, a Unix socket or
  loopback TCP, never over plain TCP from another host (it would have crossed
  the network in clear).
- otherwise the Unix socket admits the uids and gids of ``auth.unix`` (default:
  the mesh's own uid) as ``unix:uid:N``; TLS admits a client certificate's
  principal (``spiffe://…``, ``dns:…``, ``cn:…``); plain TCP admits nobody.

With ``auth.mode: off`` nobody is refused: the caller is whatever can be
told (a valid token, the peer's uid, the certificate), else ``anonymous``.

The hot path is a dict lookup: principals of plugins, uids and certificates
are cached, and so are verified tokens (by the token, until the JWT's
expiry). The secrets file, the owner's token file and the JWKS file are
checked for changes once a second, on the calling thread (a ``stat`` each);
a change re-reads them and empties the token cache, so a revoked token stops
working within a second.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestrator._auth_config import AuthConfig
from orchestrator._jwt import JwtRejected, JwtVerifier
from orchestrator._principals import OWNER_TOKEN, Principal, TransportIdentity
from orchestrator._tokens import (
    SECRETS_FILE,
    ensure_default_token,
    load_secrets,
    read_token_file,
    token_digest,
)
from sidemesh.core import UnauthenticatedError

log = logging.getLogger("sidemesh.auth")

Metadata = Mapping[str, Any] | Iterable[tuple[str, Any]]

#: Seconds between checks of the secrets, token and JWKS files for changes.
_REFRESH_INTERVAL = 1.0
_CACHE_SIZE = 4096
#: Cached until: static tokens do not expire (a change to the secrets file empties the cache).
_FOREVER = float("inf")


class AuthenticationError(UnauthenticatedError):
    """``UNAUTHENTICATED``: no credential, or one that is wrong, expired or not accepted here.

    ``identity`` is the transport identity of the refused call (for the event
    and the log); ``reason`` (``CREDENTIAL_MISSING``, ``TOKEN_INVALID``,
    ``JWT_EXPIRED``…) and ``metadata`` travel as the ``ErrorInfo`` detail.
    """

    def __init__(self, message: str, *, reason: str, identity: TransportIdentity) -> None:
        super().__init__(message, reason=reason, metadata={"listener": identity.kind})
        self.identity = identity


class Authenticator:
    """Turns ``(transport identity, metadata)`` into a principal; one per mesh.

    ``state_dir`` holds the owner's generated token (``token``) and the
    default secrets file (``tokens.yaml``). Safe to call from any thread.
    """

    def __init__(
        self,
        auth: AuthConfig,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self._on = auth.on
        self._clock = clock
        self._uids = auth.unix.uids()
        self._gids = frozenset(auth.unix.allowed_gids)
        configured = auth.tokens.file
        #: The secrets file of static tokens (may not exist when it is the default one).
        self.secrets_file = configured or state_dir / SECRETS_FILE
        self._secrets_required = configured is not None
        #: The owner's token file, when the mesh generates one.
        self.token_file = ensure_default_token(state_dir) if auth.tokens.owner_token else None
        self._jwt = JwtVerifier(auth.jwt) if auth.jwt is not None else None
        self._lock = threading.Lock()
        self._stamps = self._file_stamps()
        self._tokens = self._load_tokens()
        self._next_refresh = time.monotonic() + _REFRESH_INTERVAL
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._plugins: dict[str, Principal] = {}
        self._peers: dict[tuple[int, int], Principal] = {}
        self._certs: dict[str, Principal] = {}

    # -- the hot path ------------------------------------------------------------

    def authenticate(self, identity: TransportIdentity, metadata: Metadata = ()) -> Principal:
        """The caller of one call; raises :class:`AuthenticationError` (``UNAUTHENTICATED``)."""
        return self.authenticate_header(identity, _authorization(metadata))

    def authenticate_header(
        self, identity: TransportIdentity, authorization: str | None
    ) -> Principal:
        """As :meth:`authenticate`, given the ``authorization`` value (or None) directly."""
        kind = identity.kind
        if kind == "plugin":
            principal = self._plugins.get(identity.name)
            if principal is None:
                principal = self._plugins[identity.name] = Principal(
                    f"plugin:{identity.name}", "plugin"
                )
            return principal
        if authorization:
            if self._on:
                return self._bearer(identity, authorization)
            try:
                return self._bearer(identity, authorization)
            except AuthenticationError:
                pass  # auth off: a bad token makes the caller no one in particular
        if kind == "unix":
            return self._unix(identity)
        if kind == "tls" and identity.name:
            principal = self._certs.get(identity.name)
            if principal is None:
                principal = self._certs[identity.name] = Principal(identity.name, "mtls")
            return principal
        if not self._on:
            return _ANONYMOUS
        raise self._refuse(
            identity, "CREDENTIAL_MISSING", f"the call has no credential: {self.how_to(identity)}"
        )

    def _bearer(self, identity: TransportIdentity, authorization: str) -> Principal:
        if identity.kind == "tcp" and not identity.loopback:
            raise self._refuse(
                identity,
                "TOKEN_OVER_PLAINTEXT",
                "a bearer token is refused over plain TCP from another host (it crossed the "
                "network in clear, so treat it as leaked): connect over TLS (the mesh needs "
                "auth.tls) or from this machine",
            )
        if authorization[:7].lower() != "bearer ":
            scheme = authorization.split(" ", 1)[0][:20]
            raise self._refuse(
                identity,
                "BAD_AUTHORIZATION",
                f"the authorization metadata must be 'Bearer <token>', not {scheme!r}...",
            )
        token = authorization[7:].strip()
        if time.monotonic() >= self._next_refresh:
            self.refresh()
        cached = self._cache.get(token)
        if cached is not None and (cached[1] == _FOREVER or cached[1] > self._clock()):
            return cached[0]
        principal, until = self._verify(identity, token)
        if len(self._cache) >= _CACHE_SIZE:
            # The oldest entry; another thread may have changed the dict: it is only a cache.
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del self._cache[next(iter(self._cache))]
        self._cache[token] = (principal, until)
        return principal

    def _verify(self, identity: TransportIdentity, token: str) -> tuple[Principal, float]:
        name = self._tokens.get(token_digest(token))
        if name is not None:
            return Principal(f"token:{name}", "token"), _FOREVER
        if self._jwt is not None and token.count(".") == 2:
            try:
                principal = self._jwt.verify(token)
            except JwtRejected as exc:
                raise self._refuse(identity, exc.reason, exc.message) from None
            assert principal.expires is not None
            return principal, principal.expires + self._jwt.settings.leeway
        if token.count(".") == 2:
            what = "the bearer token looks like a JWT, but this mesh accepts none (auth.jwt)"
        else:
            what = (
                f"the bearer token is not one this mesh knows (it matches no entry of "
                f"{self.secrets_file}" + (" nor the owner's token" if self.token_file else "") + ")"
            )
        raise self._refuse(identity, "TOKEN_INVALID", f"{what}; {self.how_to(identity)}")

    def _unix(self, identity: TransportIdentity) -> Principal:
        key = (identity.uid, identity.gid)
        principal = self._peers.get(key)
        if principal is not None:
            return principal
        admitted = identity.uid in self._uids or identity.gid in self._gids
        if self._on and not admitted:
            raise self._refuse(
                identity,
                "UID_NOT_ADMITTED",
                f"uid {identity.uid} may not use this Unix socket (auth.unix admits uids "
                f"{sorted(self._uids)}" + (f" and gids {sorted(self._gids)}" if self._gids else "")
                + "): add it to auth.unix.allowed_uids (or its gid to auth.unix.allowed_gids), "
                "or present a bearer token",
            )  # fmt: skip
        groups = (f"unix:gid:{identity.gid}",) if identity.gid >= 0 else ()
        principal = self._peers[key] = Principal(f"unix:uid:{identity.uid}", "unix", groups)
        return principal

    # -- messages -------------------------------------------------------------------

    def how_to(self, identity: TransportIdentity) -> str:
        """How a caller on ``identity``'s listener proves who it is, in one sentence."""
        ways = [
            "pass a bearer token ('authorization: Bearer TOKEN' metadata; with the sidemesh CLI "
            "--token-file FILE or $SIDEMESH_TOKEN_FILE / $SIDEMESH_TOKEN; with clients, "
            "token_file= or token=)"
        ]
        if self.token_file is not None:
            ways.append(f"the mesh owner's token is in {self.token_file}")
        tls = self.auth.tls
        if identity.kind == "tls" and tls is not None and tls.client_ca is not None:
            ways.append(
                f"or a client certificate signed by {tls.client_ca} (--tls-cert and --tls-key, "
                "$SIDEMESH_TLS_CERT and $SIDEMESH_TLS_KEY)"
            )
        return f"{identity.describe()} needs one: " + "; ".join(ways)

    @staticmethod
    def _refuse(identity: TransportIdentity, reason: str, message: str) -> AuthenticationError:
        return AuthenticationError(message, reason=reason, identity=identity)

    # -- files ----------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-reads the secrets, owner token and JWKS files if they changed (called once a
        second by the hot path; call it after changing them to take effect at once)."""
        self._next_refresh = time.monotonic() + _REFRESH_INTERVAL
        jwks_changed = self._jwt.refresh() if self._jwt is not None else False
        stamps = self._file_stamps()
        if stamps == self._stamps and not jwks_changed:
            return
        with self._lock:
            if stamps != self._stamps:
                try:
                    self._tokens = self._load_tokens()
                except Exception as exc:  # keep serving with the tokens we had
                    log.error("keeping the previous tokens: %s", exc)
                self._stamps = stamps
            self._cache = {}

    def _load_tokens(self) -> dict[bytes, str]:
        tokens: dict[bytes, str] = {}
        if self._secrets_required or self.secrets_file.exists():
            tokens.update(load_secrets(self.secrets_file))
        if self.token_file is not None:
            token = read_token_file(self.token_file)
            if token:
                tokens[token_digest(token)] = OWNER_TOKEN
        return tokens

    def _file_stamps(self) -> tuple[float, ...]:
        stamps = []
        for path in (self.secrets_file, self.token_file):
            try:
                stamps.append(path.stat().st_mtime if path is not None else 0.0)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)


_ANONYMOUS = Principal("anonymous", "anonymous")


def _authorization(metadata: Metadata) -> str | None:
    if isinstance(metadata, Mapping):
        value = metadata.get("authorization")
        return str(value) if value is not None else None
    for key, value in metadata:
        if key == "authorization":
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
