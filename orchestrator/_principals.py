"""Who is calling: the transport's identity of a call, the principal it becomes, and their names.

This is the one place that defines the principal forms. Every principal is a
string, the same in policy rules, spans, events, logs and ``sidemesh`` output:

==========================  ==========================================================
``unix:uid:N``              a process on the Unix socket, by its peer credentials
                            (``SO_PEERCRED``); it also matches ``unix:gid:G`` (its gid)
``plugin:NAME``             a plugin's sidecar on its own callback socket (unforgeable)
``spiffe://DOMAIN/PATH``    a TLS client certificate's URI SAN in SPIFFE form
``dns:NAME``                else the certificate's first DNS SAN
``cn:NAME``                 else its subject common name
``token:NAME``              a static bearer token, by its name in the secrets file
                            (``token:owner`` is the one ``sidemesh serve`` generates)
``jwt:SUBJECT``             a JWT, by its principal claim (``sub`` by default); it also
                            matches ``jwt-group:G`` for each value of its groups claim
``jwt-group:G``             (in rules) the JWTs whose groups claim lists ``G``
``anonymous``               nobody proven (plain TCP, no credential); refused when auth is on
==========================  ==========================================================

In rules, ``group:NAME`` stands for a group of ``policy.groups`` (or a JWT's
group), and every form may hold glob patterns: ``unix:uid:*``,
``spiffe://mesh.local/ops/*``. A pattern matches a plugin only when it starts
with ``plugin:``: ``*`` is every client, never a plugin.

The data plane hands Python a :class:`TransportIdentity` per call; the
:class:`~orchestrator._authn.Authenticator` turns it (and the call's
``authorization`` metadata) into a :class:`Principal`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

#: The principal of a caller nothing identifies.
ANONYMOUS = "anonymous"
#: The static token ``sidemesh serve`` generates into the state dir (``token:owner``).
OWNER_TOKEN = "owner"
#: The built-in group of the mesh's own uid and its generated token (``group:owner``).
OWNER_GROUP = "owner"

#: How a principal was authenticated.
How = Literal["unix", "plugin", "mtls", "token", "jwt", "anonymous"]

_PREFIXES = ("unix:uid:", "unix:gid:", "plugin:", "spiffe://", "dns:", "cn:", "token:", "jwt:",
             "jwt-group:")  # fmt: skip
#: Names of static tokens and groups: short, printable, no glob characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class TransportIdentity:
    """What the listener proved about the peer of one call, before any bearer token.

    ``kind`` is the listener: ``unix`` (with the peer's ``uid``/``gid``/``pid``),
    ``plugin`` (a callback socket; ``name`` is the plugin), ``tls`` (``name``
    is the client certificate's principal, ``spiffe://…``, ``dns:…`` or
    ``cn:…``, or empty without one) or ``tcp`` (plain TCP). ``loopback`` says
    a TCP/TLS peer's address is a loopback address.
    """

    kind: Literal["unix", "plugin", "tls", "tcp"]
    name: str = ""
    uid: int = -1
    gid: int = -1
    pid: int = 0
    loopback: bool = False

    @classmethod
    def unix(cls, uid: int, gid: int = -1, pid: int = 0) -> TransportIdentity:
        """A peer on a Unix socket, by its ``SO_PEERCRED`` credentials."""
        return cls("unix", uid=uid, gid=gid, pid=pid)

    @classmethod
    def plugin(cls, name: str) -> TransportIdentity:
        """A plugin's sidecar on its callback socket."""
        return cls("plugin", name=name)

    @classmethod
    def tls(cls, certificate: str = "", *, loopback: bool = False) -> TransportIdentity:
        """A TLS peer; ``certificate`` is its client certificate's principal, if it sent one."""
        return cls("tls", name=certificate, loopback=loopback)

    @classmethod
    def tcp(cls, *, loopback: bool) -> TransportIdentity:
        """A plain TCP peer."""
        return cls("tcp", loopback=loopback)

    def describe(self) -> str:
        """The listener and peer in words, for messages: ``plain TCP from a loopback address``."""
        if self.kind == "unix":
            pid = f", pid {self.pid}" if self.pid else ""
            return f"the Unix socket (uid {self.uid}, gid {self.gid}{pid})"
        if self.kind == "plugin":
            return f"plugin {self.name!r}'s callback socket"
        where = "a loopback address" if self.loopback else "a remote address"
        if self.kind == "tls":
            cert = f"client certificate {self.name}" if self.name else "no client certificate"
            return f"TLS from {where} ({cert})"
        return f"plain TCP from {where}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call is from, once authenticated: ``name`` (``token:ci``), how, and its groups.

    ``groups`` are further identities the principal matches in rules
    (``unix:gid:100``, ``group:admins`` from a JWT's groups claim). ``expires``
    is the credential's expiry (seconds since the epoch), when it has one.
    """

    name: str
    how: How
    groups: tuple[str, ...] = ()
    expires: float | None = field(default=None, compare=False)

    @property
    def is_plugin(self) -> bool:
        """A plugin on its callback socket."""
        return self.how == "plugin"

    @property
    def plugin(self) -> str:
        """The plugin's name, for a plugin principal; else empty."""
        return self.name[len("plugin:") :] if self.how == "plugin" else ""


def check_pattern(pattern: str) -> str:
    """Checks a principal pattern of a rule or group; raises ``ValueError`` with the fix."""
    if pattern == "*" or pattern.startswith(_PREFIXES):
        return pattern
    if pattern.startswith("group:"):
        if not _NAME.match(pattern[len("group:") :]):
            raise ValueError(f"{pattern!r}: a group name is letters, digits and _.@+-")
        return pattern
    if pattern == ANONYMOUS:
        raise ValueError(
            "'anonymous' cannot be granted: with auth on, a call without a credential is "
            "refused before policy; use auth.mode: off for an open mesh"
        )
    if re.fullmatch(r"uid:\d+|\d+", pattern):
        uid = pattern.rpartition(":")[2]
        raise ValueError(f"{pattern!r} is not a principal; did you mean 'unix:uid:{uid}'?")
    raise ValueError(
        f"{pattern!r} is not a principal pattern: use unix:uid:N, unix:gid:N, plugin:NAME, "
        "spiffe://..., dns:NAME, cn:NAME, token:NAME, jwt:SUBJECT, jwt-group:NAME, group:NAME "
        "or '*'"
    )


def compile_globs(patterns: list[str] | tuple[str, ...]) -> re.Pattern[str] | None:
    """One regular expression for fnmatch-style ``patterns`` (``*`` crosses ``/``); None if none."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def check_name(name: str, what: str) -> str:
    """Checks a token or group name; raises ``ValueError`` with the fix."""
    if not _NAME.match(name):
        raise ValueError(
            f"{what} name {name!r} must start with a letter or digit and hold only letters, "
            "digits and _.@+- (at most 128)"
        )
    return name
