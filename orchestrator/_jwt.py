"""JWT bearer tokens, verified with PyJWT against the keys of a JWKS file.

Checked: the signature (by ``kid``, else every key of the set), ``alg`` among
``auth.jwt.algorithms`` (asymmetric only, never ``none``), ``iss``, ``aud``,
``exp`` (required) and ``nbf`` with ``auth.jwt.leeway`` seconds of clock skew.
The JWKS file is re-read when it changes (key rotation needs no restart).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from pathlib import Path
from typing import Any

import jwt

from orchestrator._auth_config import JwtSettings
from orchestrator._principals import Principal
from orchestrator._yaml_models import ConfigError, Problem

log = logging.getLogger("sidemesh.auth")

_WHAT = "JWKS file"


class JwtRejected(ValueError):
    """A JWT was refused: ``reason`` (``JWT_EXPIRED``…) and a message that says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def load_jwks(path: Path) -> tuple[dict[str, jwt.PyJWK], list[jwt.PyJWK]]:
    """The usable public keys of a JWKS file, by ``kid`` and all; raises ``ConfigError``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            path, _WHAT, [Problem("", "file not found", "check auth.jwt.jwks_file")]
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(path, _WHAT, [Problem("", f"not readable JSON: {exc}")]) from None
    raw = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise ConfigError(path, _WHAT, [Problem("keys", 'expected {"keys": [JWK, ...]}')])
    keys: list[jwt.PyJWK] = []
    for entry in raw:
        # Public signature keys only: a shared secret ("oct") in a JWKS would let anyone
        # who can read the file sign tokens.
        if not isinstance(entry, dict) or entry.get("kty") == "oct" or entry.get("use") == "enc":
            continue
        try:
            keys.append(jwt.PyJWK(entry))
        except jwt.PyJWTError as exc:
            log.warning("%s: skipping a key (kid %r): %s", path, entry.get("kid"), exc)
    if not keys:
        raise ConfigError(
            path, _WHAT, [Problem("keys", "no usable public signature key (RSA, EC or OKP)")]
        )
    return {k.key_id: k for k in keys if k.key_id}, keys


class JwtVerifier:
    """Verifies JWTs for one issuer; ``verify(token)`` returns the caller's principal."""

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._path = settings.jwks_file
        self._lock = threading.Lock()
        self._mtime = self._stat()
        self._by_kid, self._keys = load_jwks(self._path)
        self._algorithms = list(settings.algorithms)
        self._options: Any = {"require": ["exp", "iss", "aud"]}

    def refresh(self) -> bool:
        """Re-reads the JWKS file if it changed; True when the keys did (cached tokens go)."""
        mtime = self._stat()
        if mtime == self._mtime:
            return False
        with self._lock:
            if mtime == self._mtime:
                return False
            self._mtime = mtime
            try:
                self._by_kid, self._keys = load_jwks(self._path)
            except ConfigError as exc:
                log.error("keeping the previous JWT keys: %s", exc)
                return False
        log.info("re-read the JWT keys of %s", self._path)
        return True

    def verify(self, token: str) -> Principal:
        """The principal of a valid JWT; raises :class:`JwtRejected` saying what is wrong."""
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtRejected(
                "TOKEN_INVALID", "the bearer token is neither a known token nor a JWT"
            ) from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise JwtRejected(
                "JWT_ALGORITHM",
                f"the JWT is signed with {alg!r}, which auth.jwt.algorithms "
                f"({', '.join(self._algorithms)}) does not accept",
            )
        kid = header.get("kid")
        keys = self._keys_for(kid)
        last: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token, key.key, algorithms=[alg], audience=s.audience, issuer=s.issuer,
                    leeway=s.leeway, options=self._options,
                )  # fmt: skip
                return self._principal(claims)
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError) as exc:
                last = exc
            except jwt.PyJWTError as exc:
                raise self._rejection(exc, token) from None
        which = f"key {kid!r}" if kid else "any key"
        raise JwtRejected(
            "JWT_SIGNATURE",
            f"the JWT's signature does not verify with {which} of {self._path}"
            + (f" ({last})" if last and str(last) != "Signature verification failed" else ""),
        )

    def _keys_for(self, kid: Any) -> list[jwt.PyJWK]:
        if not kid:
            return self._keys
        key = self._by_kid.get(kid)
        if key is None and self.refresh():
            key = self._by_kid.get(kid)
        if key is None:
            raise JwtRejected(
                "JWT_UNKNOWN_KEY",
                f"the JWT names key {kid!r}, which {self._path} does not hold "
                f"(it has: {', '.join(sorted(self._by_kid)) or 'keys without kid'})",
            )
        return [key]

    def _principal(self, claims: dict[str, Any]) -> Principal:
        s = self.settings
        subject = claims.get(s.principal_claim)
        if not isinstance(subject, str | int) or isinstance(subject, bool) or subject == "":
            raise JwtRejected(
                "JWT_CLAIM_MISSING",
                f"the JWT has no {s.principal_claim!r} claim to name the caller by "
                "(auth.jwt.principal_claim)",
            )
        groups: tuple[str, ...] = ()
        if s.groups_claim:
            value = claims.get(s.groups_claim) or []
            names = value.split() if isinstance(value, str) else value
            if isinstance(names, list):
                groups = tuple(f"jwt-group:{g}" for g in names if isinstance(g, str) and g)
        return Principal(f"jwt:{subject}", "jwt", groups, float(claims["exp"]))

    def _rejection(self, exc: jwt.PyJWTError, token: str) -> JwtRejected:
        s = self.settings
        try:
            claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = {}
        issuer = f" from {s.issuer}"
        if isinstance(exc, jwt.ExpiredSignatureError):
            return JwtRejected(
                "JWT_EXPIRED",
                f"the JWT expired at {_when(claims.get('exp'))} (leeway {s.leeway:g} s); "
                f"get a fresh token{issuer}",
            )
        if isinstance(exc, jwt.ImmatureSignatureError):
            return JwtRejected(
                "JWT_NOT_YET_VALID",
                f"the JWT is not valid before {_when(claims.get('nbf'))}; check the clocks of "
                "the issuer and this machine",
            )
        if isinstance(exc, jwt.InvalidAudienceError):
            return JwtRejected(
                "JWT_AUDIENCE",
                f"the JWT's audience {claims.get('aud')!r} is not one this mesh accepts "
                f"({', '.join(s.audience)}, auth.jwt.audience); ask {s.issuer} for a token "
                "for this mesh",
            )
        if isinstance(exc, jwt.InvalidIssuerError):
            return JwtRejected(
                "JWT_ISSUER",
                f"the JWT's issuer {claims.get('iss')!r} is not {s.issuer!r} (auth.jwt.issuer)",
            )
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return JwtRejected(
                "JWT_CLAIM_MISSING", f"the JWT has no {exc.claim!r} claim, which is required"
            )
        return JwtRejected("JWT_INVALID", f"the JWT is not valid: {exc}")

    def _stat(self) -> float:
        try:
            return self._path.stat().st_mtime
        except OSError:
            return 0.0


def _when(timestamp: Any) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(float(timestamp), datetime.UTC)
    except (TypeError, ValueError, OverflowError):
        return "an unreadable time"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
