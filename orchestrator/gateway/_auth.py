"""Who calls the HTTP endpoint, and what they may see and call: two small hooks.

- An :class:`Authenticator` turns a request's headers into a principal
  (``jwt:alice``, ``token:ci``, ...) or refuses it with :class:`Unauthenticated`,
  which the endpoint answers with ``401`` and a ``WWW-Authenticate`` header
  pointing at the protected-resource metadata (RFC 9728), as MCP's
  authorization spec asks.
- An :class:`Authorizer` answers ``may(principal, kind, target)`` for kinds
  ``tool``, ``agent`` and ``mcp`` (an MCP server's resources and prompts):
  the gateway lists only what the principal may use and refuses the rest.

The defaults: :class:`Anonymous` (no authentication) or, with
``mcp.auth.enabled``, :class:`JwtAuthenticator` (bearer JWTs checked against a
JWKS file with PyJWT); :class:`AllowAll` until the mesh's policy engine is
wired in its place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jwt

from orchestrator._mcp_config import McpAuthSettings

#: The principal of an unauthenticated caller (no auth configured).
ANONYMOUS = "anonymous"
#: Seconds a JWKS file is trusted before it is read again (key rotation).
JWKS_RELOAD = 60.0


class Unauthenticated(Exception):
    """The request has no acceptable credentials; ``error`` is RFC 6750's code."""

    def __init__(self, message: str, *, error: str = "invalid_token", status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.error = error
        self.status = status


class Authenticator(Protocol):
    """Request headers (lowercase names) to a principal, or ``Unauthenticated``.

    ``resource`` is the URI of the MCP endpoint asked (RFC 8707): a token must
    have been issued for it.
    """

    async def authenticate(self, headers: Mapping[str, str], resource: str) -> str: ...


class Authorizer(Protocol):
    """The policy: may ``principal`` use ``target`` (a mesh name) of ``kind``?"""

    def may(self, principal: str, kind: str, target: str) -> bool: ...


class Anonymous:
    """No authentication: every caller is :data:`ANONYMOUS`."""

    async def authenticate(self, headers: Mapping[str, str], resource: str) -> str:
        return ANONYMOUS


class AllowAll:
    """Every principal may use everything (until the policy engine is wired)."""

    def may(self, principal: str, kind: str, target: str) -> bool:
        return True


class JwtAuthenticator:
    """Bearer JWTs signed by a key of a JWKS file; the principal is ``jwt:<sub>``.

    Checks the signature, ``exp``/``nbf``/``iat`` (with leeway), the issuer,
    the audience (the endpoint's resource URI, RFC 8707, or ``audiences``)
    and the required scopes (``scope`` or ``scp``).
    """

    def __init__(self, settings: McpAuthSettings) -> None:
        assert settings.jwks_file is not None
        self._settings = settings
        self._path = settings.jwks_file
        self._issuers = settings.issuers or settings.authorization_servers
        self._keys: dict[str, Any] = {}
        self._loaded = 0.0
        self._load()

    def _load(self) -> None:
        jwks = jwt.PyJWKSet.from_dict(json.loads(Path(self._path).read_text()))
        self._keys = {k.key_id or f"#{i}": k for i, k in enumerate(jwks.keys)}
        self._loaded = time.monotonic()

    def _key(self, kid: str | None) -> Any:
        if time.monotonic() - self._loaded > JWKS_RELOAD or (kid and kid not in self._keys):
            self._load()
        if kid is not None and kid in self._keys:
            return self._keys[kid]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        raise Unauthenticated(f"the token's key {kid!r} is not one of this mesh's keys")

    async def authenticate(self, headers: Mapping[str, str], resource: str) -> str:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("a bearer token is required", error="")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
            key = self._key(header.get("kid"))
            claims = jwt.decode(
                token,
                key=key,
                algorithms=self._settings.algorithms,
                audience=self._settings.audiences or [resource],
                issuer=self._issuers or None,
                leeway=self._settings.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as err:
            raise Unauthenticated(f"the token is not valid: {err}") from None
        granted = set(str(claims.get("scope", "")).split()) | set(claims.get("scp") or [])
        missing = [s for s in self._settings.required_scopes if s not in granted]
        if missing:
            raise Unauthenticated(
                f"the token lacks the scopes {missing}", error="insufficient_scope", status=403
            )
        return f"jwt:{claims['sub']}"


def protected_resource_metadata(settings: McpAuthSettings, resource: str) -> dict[str, Any]:
    """The RFC 9728 protected-resource metadata document of an endpoint."""
    document: dict[str, Any] = {
        "resource": resource,
        "authorization_servers": list(settings.authorization_servers),
        "bearer_methods_supported": ["header"],
    }
    if settings.scopes_supported:
        document["scopes_supported"] = list(settings.scopes_supported)
    return document


def metadata_path(endpoint_path: str) -> str:
    """Where RFC 9728 puts the metadata of the resource at ``endpoint_path``."""
    return "/.well-known/oauth-protected-resource" + endpoint_path.rstrip("/")
