"""Authentication: each listener and credential kind, as the caller and the operator see it."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2

from clients import UnauthenticatedError
from orchestrator._auth_config import AuthConfig
from orchestrator._authn import AuthenticationError, Authenticator
from orchestrator._principals import Principal, TransportIdentity
from orchestrator._tokens import add_secret, ensure_default_token, hash_line, new_token
from orchestrator._yaml_models import ConfigError

ME = os.getuid()
UNIX = TransportIdentity.unix(ME, os.getgid(), 4242)
LOOPBACK = TransportIdentity.tcp(loopback=True)
REMOTE = TransportIdentity.tcp(loopback=False)
TLS = TransportIdentity.tls(loopback=False)
PLUGIN = TransportIdentity.plugin("assistant")
ISSUER = "https://idp.example"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {token}")]


def refused(authenticator: Authenticator, identity: TransportIdentity, metadata: Any = ()) -> Any:
    with pytest.raises(UnauthenticatedError) as caught:
        authenticator.authenticate(identity, metadata)
    assert isinstance(caught.value, AuthenticationError)
    return caught.value


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def make(state_dir: Path, **auth: Any) -> Authenticator:
    return Authenticator(AuthConfig.model_validate(auth), state_dir)


# -- plugins, unix peers, certificates -------------------------------------------------


def test_a_plugin_is_its_callback_socket_whatever_it_sends(state_dir: Path) -> None:
    for mode in ("on", "off"):
        a = make(state_dir, mode=mode)
        principal = a.authenticate(PLUGIN, bearer("smt_forged"))
        assert principal == Principal("plugin:assistant", "plugin")
        assert principal.plugin == "assistant"
        assert a.authenticate(PLUGIN) is principal  # cached


def test_the_unix_socket_admits_the_mesh_uid_by_default_and_refuses_others(
    state_dir: Path,
) -> None:
    a = make(state_dir)
    principal = a.authenticate(UNIX)
    assert principal.name == f"unix:uid:{ME}"
    assert principal.how == "unix"
    assert principal.groups == (f"unix:gid:{os.getgid()}",)
    err = refused(a, TransportIdentity.unix(65534, 65534, 77))
    assert err.reason == "UID_NOT_ADMITTED"
    assert err.message.startswith(
        f"uid 65534 may not use this Unix socket (auth.unix admits uids [{ME}])"
    )
    assert "add it to auth.unix.allowed_uids" in err.message
    assert "or present a bearer token" in err.message
    assert err.identity.pid == 77


def test_allowed_uids_and_gids_widen_the_unix_socket(state_dir: Path) -> None:
    a = make(state_dir, unix={"allowed_uids": [ME, 1234], "allowed_gids": [500]})
    assert a.authenticate(TransportIdentity.unix(1234, 1234)).name == "unix:uid:1234"
    assert a.authenticate(TransportIdentity.unix(999, 500)).name == "unix:uid:999"
    assert refused(a, TransportIdentity.unix(999, 999)).reason == "UID_NOT_ADMITTED"
    assert AuthConfig.model_validate({}).unix.socket_mode() == 0o600
    assert AuthConfig.model_validate({"unix": {"allowed_gids": [5]}}).unix.socket_mode() == 0o660
    assert a.auth.unix.socket_mode() == 0o666


def test_a_tls_client_certificate_is_the_principal(state_dir: Path) -> None:
    a = make(state_dir)
    for name in ("spiffe://mesh.local/client/ci", "dns:ci.mesh.local", "cn:ci"):
        principal = a.authenticate(TransportIdentity.tls(name))
        assert (principal.name, principal.how) == (name, "mtls")


# -- no credential ----------------------------------------------------------------------


def test_no_credential_over_tcp_or_tls_says_how_to_authenticate(state_dir: Path) -> None:
    a = make(state_dir)
    err = refused(a, LOOPBACK)
    assert err.reason == "CREDENTIAL_MISSING"
    assert err.message.startswith(
        "the call has no credential: plain TCP from a loopback address needs one: pass a "
        "bearer token ('authorization: Bearer TOKEN' metadata; with the sidemesh CLI "
        "--token-file FILE or $SIDEMESH_TOKEN_FILE / $SIDEMESH_TOKEN; with clients, "
        "token_file= or token=)"
    )
    assert f"the mesh owner's token is in {state_dir / 'token'}" in err.message
    # The rich status: ErrorInfo with the reason, for programs.
    info = error_details_pb2.ErrorInfo()
    assert err.to_status_proto().details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "CREDENTIAL_MISSING", "sidemesh.dev", {"listener": "tcp"},
    )  # fmt: skip

    tls = make(state_dir, tls={"cert": "/c.pem", "key": "/k.pem", "client_ca": "/ca.pem"})
    err = refused(tls, TLS)
    assert "TLS from a remote address (no client certificate) needs one" in err.message
    assert "or a client certificate signed by /ca.pem (--tls-cert and --tls-key" in err.message


# -- static tokens ----------------------------------------------------------------------


def test_the_owner_token_is_generated_owner_only_and_accepted(state_dir: Path) -> None:
    a = make(state_dir)
    assert a.token_file == state_dir / "token"
    assert stat.S_IMODE(a.token_file.stat().st_mode) == 0o600
    token = a.token_file.read_text().strip()
    assert token.startswith("smt_") and len(token) > 40
    principal = a.authenticate(LOOPBACK, bearer(token))
    assert (principal.name, principal.how) == ("token:owner", "token")
    assert a.authenticate(UNIX, bearer(token)).name == "token:owner"
    assert a.authenticate(LOOPBACK, {"authorization": f"bearer {token}"}).name == "token:owner"
    # A restart keeps the token; one that others could read is replaced.
    assert ensure_default_token(state_dir).read_text().strip() == token
    a.token_file.chmod(0o644)
    assert ensure_default_token(state_dir).read_text().strip() != token
    assert stat.S_IMODE(a.token_file.stat().st_mode) == 0o600
    assert make(state_dir, tokens={"owner_token": False}).token_file is None


def test_static_tokens_from_the_secrets_file(state_dir: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "tokens.yaml"
    ci = new_token()
    add_secret(secrets, "ci", ci)
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert secrets.read_text() == f"ci: {hash_line(ci)}\n"
    assert ci not in secrets.read_text()
    a = make(state_dir, tokens={"file": str(secrets)})
    assert a.authenticate(LOOPBACK, bearer(ci)) == Principal("token:ci", "token")
    err = refused(a, LOOPBACK, bearer("smt_wrong"))
    assert err.reason == "TOKEN_INVALID"
    assert err.message.startswith(
        f"the bearer token is not one this mesh knows (it matches no entry of {secrets} nor "
        "the owner's token); plain TCP from a loopback address needs one: pass a bearer token"
    )
    assert "smt_wrong" not in err.message


def test_a_revoked_token_stops_working(state_dir: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "tokens.yaml"
    ci, other = new_token(), new_token()
    add_secret(secrets, "ci", ci)
    a = make(state_dir, tokens={"file": str(secrets)})
    assert a.authenticate(LOOPBACK, bearer(ci)).name == "token:ci"
    add_secret(secrets, "other", other)
    secrets.write_text(f"other: {hash_line(other)}\n")
    os.utime(secrets, (time.time() + 5, time.time() + 5))
    a.refresh()
    assert refused(a, LOOPBACK, bearer(ci)).reason == "TOKEN_INVALID"
    assert a.authenticate(LOOPBACK, bearer(other)).name == "token:other"


def test_a_secrets_file_others_can_read_is_refused(state_dir: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "tokens.yaml"
    secrets.write_text(f"ci: {hash_line(new_token())}\n")
    secrets.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        make(state_dir, tokens={"file": str(secrets)})
    assert str(caught.value) == (
        f"{secrets} is not a valid Sidemesh tokens file:\n"
        "  - the file: readable by group or others (mode 0644): it holds credentials\n"
        f"    fix: chmod 600 {secrets}"
    )


def test_a_malformed_secrets_file_names_the_entry_and_the_fix(
    state_dir: Path, tmp_path: Path
) -> None:
    secrets = tmp_path / "tokens.yaml"
    secrets.write_text("ci: smt_plaintext_token\nowner: sha256:" + "0" * 64 + "\n")
    secrets.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        make(state_dir, tokens={"file": str(secrets)})
    text = str(caught.value)
    assert (
        "field 'ci': expected sha256: and 64 hex digits (the hash, never the token itself)" in text
    )
    assert "sidemesh token NAME makes a token and its line" in text
    assert "field 'owner': token:owner is the token sidemesh serve generates" in text
    with pytest.raises(ConfigError, match="file not found"):
        make(state_dir, tokens={"file": str(tmp_path / "missing.yaml")})


def test_tokens_are_refused_over_plain_tcp_from_another_host(state_dir: Path) -> None:
    a = make(state_dir)
    assert a.token_file is not None
    err = refused(a, REMOTE, bearer(a.token_file.read_text().strip()))
    assert err.reason == "TOKEN_OVER_PLAINTEXT"
    assert "connect over TLS (the mesh needs auth.tls) or from this machine" in err.message
    assert a.authenticate(TLS, bearer(a.token_file.read_text().strip())).name == "token:owner"


def test_authorization_must_be_a_bearer_token(state_dir: Path) -> None:
    err = refused(make(state_dir), LOOPBACK, [("authorization", "Basic dXNlcjpwYXNz")])
    assert err.reason == "BAD_AUTHORIZATION"
    assert err.message == "the authorization metadata must be 'Bearer <token>', not 'Basic'..."


# -- JWTs ---------------------------------------------------------------------------------


class Issuer:
    """A JWT issuer with an EC and an RSA key in a JWKS file."""

    def __init__(self, directory: Path) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwks = directory / "jwks.json"
        keys = [
            {**jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True),
             "kid": "ec-1", "use": "sig"},
            {**jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True),
             "kid": "rsa-1"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "shared"},  # never used: not a public key
        ]  # fmt: skip
        self.jwks.write_text(json.dumps({"keys": keys}))

    def token(
        self, *, kid: str = "ec-1", key: Any = None, alg: str = "ES256", **claims: Any
    ) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": "sidemesh", "sub": "alice@example.com",
                   "iat": now, "exp": now + 300, **claims}  # fmt: skip
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key if key is not None else (self.ec if alg.startswith("ES") else self.rsa)
        return jwt.encode(payload, signer, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer(tmp_path)


@pytest.fixture
def jwt_auth(state_dir: Path, issuer: Issuer) -> Callable[..., Authenticator]:
    def build(**settings: Any) -> Authenticator:
        jwt_settings = {"issuer": ISSUER, "audience": "sidemesh", "jwks_file": str(issuer.jwks),
                        "groups_claim": "groups", **settings}  # fmt: skip
        return make(state_dir, jwt=jwt_settings)

    return build


def test_a_valid_jwt_names_the_caller_and_its_groups(
    jwt_auth: Callable[..., Authenticator], issuer: Issuer
) -> None:
    a = jwt_auth(algorithms=["ES256", "RS256"])
    token = issuer.token(groups=["admins", "ops"])
    principal = a.authenticate(TLS, bearer(token))
    assert (principal.name, principal.how) == ("jwt:alice@example.com", "jwt")
    assert principal.groups == ("jwt-group:admins", "jwt-group:ops")
    assert principal.expires is not None and principal.expires > time.time()
    assert a.authenticate(TLS, bearer(token)) is principal  # verified once, then cached
    rsa_token = issuer.token(kid="rsa-1", alg="RS256", sub="bob")
    assert a.authenticate(UNIX, bearer(rsa_token)).name == "jwt:bob"
    no_kid = issuer.token(kid="", sub="carol")
    assert a.authenticate(LOOPBACK, bearer(no_kid)).name == "jwt:carol"
    other = jwt_auth(principal_claim="email")
    assert other.authenticate(TLS, bearer(issuer.token(email="a@x"))).name == "jwt:a@x"


@pytest.mark.parametrize(
    ("claims", "reason", "message"),
    [
        ({"exp": int(time.time()) - 120}, "JWT_EXPIRED", "the JWT expired at "),
        # A day ahead: the parameters are made when the tests are collected, minutes before.
        ({"nbf": int(time.time()) + 86400}, "JWT_NOT_YET_VALID", "the JWT is not valid before "),
        ({"aud": "other-mesh"}, "JWT_AUDIENCE",
         "the JWT's audience 'other-mesh' is not one this mesh accepts (sidemesh, "
         "auth.jwt.audience)"),
        ({"iss": "https://evil.example"}, "JWT_ISSUER",
         "the JWT's issuer 'https://evil.example' is not 'https://idp.example' (auth.jwt.issuer)"),
        ({"exp": None}, "JWT_CLAIM_MISSING", "the JWT has no 'exp' claim, which is required"),
        ({"sub": None}, "JWT_CLAIM_MISSING", "the JWT has no 'sub' claim to name the caller by"),
    ],
)  # fmt: skip
def test_a_jwt_that_is_expired_early_or_for_someone_else_is_refused(
    jwt_auth: Callable[..., Authenticator],
    issuer: Issuer,
    claims: dict[str, Any],
    reason: str,
    message: str,
) -> None:
    err = refused(jwt_auth(), TLS, bearer(issuer.token(**claims)))
    assert err.reason == reason
    assert err.message.startswith(message), err.message


def test_a_jwt_within_the_leeway_is_accepted(
    jwt_auth: Callable[..., Authenticator], issuer: Issuer
) -> None:
    token = issuer.token(exp=int(time.time()) - 10)
    assert jwt_auth(leeway=30).authenticate(TLS, bearer(token)).name == "jwt:alice@example.com"
    assert refused(jwt_auth(leeway=0), TLS, bearer(token)).reason == "JWT_EXPIRED"


def test_a_jwt_signed_by_another_key_or_algorithm_is_refused(
    jwt_auth: Callable[..., Authenticator], issuer: Issuer
) -> None:
    a = jwt_auth()
    forged = issuer.token(key=ec.generate_private_key(ec.SECP256R1()))
    err = refused(a, TLS, bearer(forged))
    assert err.reason == "JWT_SIGNATURE"
    assert err.message == f"the JWT's signature does not verify with key 'ec-1' of {issuer.jwks}"
    err = refused(a, TLS, bearer(issuer.token(kid="ec-9")))
    assert err.reason == "JWT_UNKNOWN_KEY"
    assert "names key 'ec-9', which" in err.message and "(it has: ec-1, rsa-1)" in err.message
    unsigned = jwt.encode({"iss": ISSUER, "aud": "sidemesh", "sub": "x", "exp": 2**31},
                          None, algorithm="none")  # fmt: skip
    err = refused(a, TLS, bearer(unsigned))
    assert err.reason == "JWT_ALGORITHM"
    assert err.message == (
        "the JWT is signed with 'none', which auth.jwt.algorithms (RS256, ES256) does not accept"
    )
    hmac = jwt.encode({"sub": "x"}, "s" * 32, algorithm="HS256", headers={"kid": "shared"})
    assert refused(a, TLS, bearer(hmac)).reason == "JWT_ALGORITHM"
    with pytest.raises(ValueError, match="HS256"):
        jwt_auth(algorithms=["HS256"])


def test_a_cached_jwt_stops_working_when_it_expires(
    jwt_auth: Callable[..., Authenticator], issuer: Issuer
) -> None:
    a = jwt_auth(leeway=0)
    token = issuer.token(exp=int(time.time()) + 1)
    assert a.authenticate(TLS, bearer(token)).name == "jwt:alice@example.com"
    time.sleep(max(0.0, int(time.time()) + 1.05 - time.time()) + 1)
    assert refused(a, TLS, bearer(token)).reason == "JWT_EXPIRED"


def test_a_jwt_without_jwt_config_is_named_as_such(state_dir: Path, issuer: Issuer) -> None:
    err = refused(make(state_dir), TLS, bearer(issuer.token()))
    assert err.reason == "TOKEN_INVALID"
    assert err.message.startswith(
        "the bearer token looks like a JWT, but this mesh accepts none (auth.jwt)"
    )


def test_a_bad_jwks_file_is_a_config_error(state_dir: Path, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(ConfigError, match="no usable public signature key"):
        make(state_dir, jwt={"issuer": ISSUER, "audience": ["a"], "jwks_file": str(jwks)})


# -- auth off ------------------------------------------------------------------------


def test_auth_off_refuses_nobody_and_still_tells_who_is_calling(state_dir: Path) -> None:
    a = make(state_dir, mode="off")
    assert a.authenticate(LOOPBACK) == Principal("anonymous", "anonymous")
    assert a.authenticate(REMOTE, bearer("smt_wrong")).name == "anonymous"
    assert a.authenticate(TransportIdentity.unix(65534, 65534)).name == "unix:uid:65534"
    assert a.token_file is not None
    assert a.authenticate(LOOPBACK, bearer(a.token_file.read_text().strip())).name == "token:owner"
