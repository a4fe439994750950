"""Static bearer tokens: the secrets file of hashed tokens, and the owner's generated token.

The secrets file is YAML, one ``NAME: sha256:HEX`` line per token, owner-only
(a file that the group or others can read is refused). The mesh keeps only
SHA-256 hashes: a token is 256 random bits, so its hash cannot be reversed
or guessed, and hashing costs a microsecond per call (a deliberately slow
hash such as scrypt or argon2 protects low-entropy passwords, which these are
not; GitHub stores its tokens the same way). Make a token and its line with::

    sidemesh token ci            # prints the token once; appends ci: sha256:... to the file
    python -c 'import secrets; print("smt_" + secrets.token_urlsafe(32))'  # or by hand,
    printf %s "$TOKEN" | sha256sum                                        # then its hash

``sidemesh serve`` generates the owner's token (``token:owner``) into
``<state_dir>/token`` (mode 0600), where the CLI and ``clients`` on the same
machine find it, as Jupyter's clients find its server's token.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import stat
from pathlib import Path

import yaml

from orchestrator._principals import OWNER_TOKEN, check_name
from orchestrator._yaml_models import ConfigError, Problem
from sidemesh.core import TOKEN_FILE

log = logging.getLogger("sidemesh.auth")

#: The default secrets file, in the state dir.
SECRETS_FILE = "tokens.yaml"
#: Generated tokens start with this, so secret scanners can recognise them.
TOKEN_PREFIX = "smt_"

_WHAT = "Sidemesh tokens file"
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


def new_token() -> str:
    """A fresh random token: 256 bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    """The SHA-256 digest a token is looked up by."""
    return hashlib.sha256(token.encode()).digest()


def hash_line(token: str) -> str:
    """A token's entry value in the secrets file: ``sha256:HEX``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def check_private(path: Path, what: str) -> os.stat_result:
    """Stats ``path``; raises ``ConfigError`` unless it is a regular file only its owner reads."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(path, what, [Problem("", "file not found", "check the path")]) from None
    except OSError as exc:
        raise ConfigError(path, what, [Problem("", f"cannot read: {exc.strerror}")]) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, what, [Problem("", "not a regular file", "give a file")])
    if st.st_mode & 0o077:
        raise ConfigError(
            path,
            what,
            [
                Problem(
                    "",
                    f"readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): it holds "
                    "credentials",
                    f"chmod 600 {path}",
                )
            ],
        )
    return st


def load_secrets(path: Path) -> dict[bytes, str]:
    """Reads a secrets file: token digest -> token name. Raises ``ConfigError``."""
    check_private(path, _WHAT)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, _WHAT, [Problem("", f"cannot read: {exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, _WHAT, [Problem("", f"invalid YAML: {exc}", "fix it")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, _WHAT, [Problem("", "expected lines of NAME: sha256:HEX")])
    table: dict[bytes, str] = {}
    problems = []
    for name, value in data.items():
        try:
            check_name(str(name), "token")
        except ValueError as exc:
            problems.append(Problem(str(name), str(exc), "rename it"))
            continue
        if name == OWNER_TOKEN:
            problems.append(
                Problem(
                    "owner",
                    "token:owner is the token sidemesh serve generates into the state dir",
                    "choose another name",
                )
            )
            continue
        match = _HASH.match(str(value).strip().lower()) if isinstance(value, str) else None
        if match is None:
            problems.append(
                Problem(
                    str(name),
                    "expected sha256: and 64 hex digits (the hash, never the token itself)",
                    'sidemesh token NAME makes a token and its line; or: printf %s "$TOKEN" '
                    "| sha256sum",
                )
            )
            continue
        table[bytes.fromhex(match.group(1))] = str(name)
    if problems:
        raise ConfigError(path, _WHAT, problems)
    return table


def add_secret(path: Path, name: str, token: str) -> None:
    """Adds (or replaces) ``name``'s hashed entry in the secrets file, creating it owner-only."""
    check_name(name, "token")
    if name == OWNER_TOKEN:
        raise ValueError("'owner' is the name of the token sidemesh serve generates")
    lines: list[str] = []
    if path.exists():
        load_secrets(path)  # refuses a world-readable or malformed file before we touch it
        lines = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.split(":", 1)[0].strip() != name
        ]
    lines.append(f"{name}: {hash_line(token)}")
    _write_private(path, "\n".join(lines) + "\n")


def ensure_default_token(state_dir: Path) -> Path:
    """The owner's token file ``<state_dir>/token``, created (mode 0600) when missing.

    A token file that others could read is replaced by a new token (the old one
    may have leaked). Returns the file's path; its content is the token.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        usable = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        if usable and not st.st_mode & 0o077 and path.read_text().strip():
            return path
        log.warning("replacing the owner's token %s: it was readable by others or empty", path)
        path.unlink()
    _write_private(path, new_token() + "\n")
    return path


def read_token_file(path: Path) -> str:
    """The token in ``path`` (its first line, stripped)."""
    text = path.read_text(encoding="utf-8").strip()
    return text.splitlines()[0].strip() if text else ""


def _write_private(path: Path, text: str) -> None:
    """Writes ``path`` atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)
