"""``sidemesh certs`` and ``sidemesh token``: development certificates, and static tokens."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from orchestrator._certs import CA_CERT, CertError, Issued, create_ca, issue_client, issue_server
from orchestrator._config import load_config
from orchestrator._tokens import SECRETS_FILE, add_secret, new_token
from orchestrator._yaml_models import ConfigError
from orchestrator.cli._common import EXIT_OK, usage_error


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``certs`` (with ``ca``, ``server``, ``client``) and ``token``."""
    p = sub.add_parser(
        "certs",
        help="make a development CA and the server and client certificates it signs",
        description="Make TLS certificates for development and tests (EC P-256): a CA, then "
        "server certificates (for auth.tls) and client certificates (mTLS identities). "
        "Keys are written owner-only. Use your own PKI in production.",
    )
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    ca = kinds.add_parser("ca", help="make the CA (ca.pem, ca-key.pem)")
    ca.add_argument("--name", default="Sidemesh development CA", help="the CA's common name")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    _common(ca, days=3650)
    ca.set_defaults(run=_ca)

    server = kinds.add_parser("server", help="a server certificate signed by the CA")
    server.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name of the server (repeatable), e.g. localhost",
    )
    server.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="IP",
        help="an IP address of the server (repeatable), e.g. 127.0.0.1",
    )
    server.add_argument("--out", default="server", help="file name stem (default: server)")
    _common(server, days=365)
    server.set_defaults(run=_server)

    client = kinds.add_parser("client", help="a client certificate signed by the CA")
    client.add_argument(
        "--spiffe", metavar="URI", help="the client's SPIFFE ID, e.g. spiffe://mesh.local/client/ci"
    )
    client.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name for the client (principal dns:NAME)",
    )
    client.add_argument(
        "--name", help="the subject common name (principal cn:NAME without --spiffe or --dns)"
    )
    client.add_argument("--out", help="file name stem (default: client-NAME)")
    _common(client, days=365)
    client.set_defaults(run=_client)

    token = sub.add_parser(
        "token",
        help="make a static bearer token and add its hash to the secrets file",
        description="Make a random bearer token NAME (principal token:NAME), add its SHA-256 "
        "hash to the secrets file (owner-only), and print the token once: the mesh keeps only "
        "the hash. Running it again for NAME replaces the token.",
    )
    token.add_argument("name", metavar="NAME", help="the token's name, e.g. ci")
    token.add_argument(
        "--file",
        type=Path,
        help=f"the secrets file (default: auth.tokens.file, else <state_dir>/{SECRETS_FILE})",
    )
    token.add_argument(
        "--out", type=Path, help="write the token to this file (mode 0600) instead of printing it"
    )
    token.add_argument("--config", "-c", type=Path, help="sidemesh.yaml (for its state_dir)")
    token.set_defaults(run=_token)


def _common(p: argparse.ArgumentParser, *, days: int) -> None:
    p.add_argument("--dir", type=Path, help="where the files go (default: <state_dir>/certs)")
    p.add_argument("--config", "-c", type=Path, help="sidemesh.yaml (for its state_dir)")
    p.add_argument("--days", type=int, default=days, help=f"validity in days (default: {days})")


def _state_dir(args: argparse.Namespace) -> Path:
    try:
        return load_config(args.config).state_dir
    except ConfigError as exc:
        raise SystemExit(usage_error(str(exc))) from None


def _directory(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else _state_dir(args) / "certs"


def _ca(args: argparse.Namespace) -> int:
    directory = _directory(args)
    try:
        issued = create_ca(directory, name=args.name, days=args.days, force=args.force)
    except CertError as exc:
        return usage_error(str(exc))
    _print(issued)
    print(
        "next: sidemesh certs server --dns localhost --ip 127.0.0.1"
        + (f" --dir {directory}" if args.dir else "")
    )
    return EXIT_OK


def _server(args: argparse.Namespace) -> int:
    directory = _directory(args)
    try:
        issued = issue_server(
            directory, dns=args.dns, ips=args.ip, file_name=args.out, days=args.days
        )
    except CertError as exc:
        return usage_error(str(exc))
    _print(issued)
    print(f"for: {', '.join(issued.names)}")
    print("in sidemesh.yaml:")
    print("  auth:")
    print(f"    tls: {{cert: {issued.cert}, key: {issued.key}, client_ca: {directory / CA_CERT}}}")
    return EXIT_OK


def _client(args: argparse.Namespace) -> int:
    directory = _directory(args)
    try:
        issued = issue_client(
            directory,
            spiffe=args.spiffe,
            dns=args.dns,
            name=args.name,
            file_name=args.out,
            days=args.days,
        )
    except CertError as exc:
        return usage_error(str(exc))
    _print(issued)
    print(f"principal: {issued.names[0]}")
    print(f"use: --tls-ca {directory / CA_CERT} --tls-cert {issued.cert} --tls-key {issued.key}")
    return EXIT_OK


def _token(args: argparse.Namespace) -> int:
    path: Path | None = args.file
    if path is None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return usage_error(str(exc))
        auth = getattr(config, "auth", None)  # the auth section, once the config has one
        configured = auth.tokens.file if auth is not None else None
        path = configured or config.state_dir / SECRETS_FILE
    token = new_token()
    try:
        add_secret(path, args.name, token)
    except (ValueError, OSError) as exc:
        return usage_error(str(exc))
    print(f"added token:{args.name} to {path} (the mesh re-reads it within a second)")
    if args.out is not None:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"the token is in {args.out}: pass it with --token-file {args.out}")
    else:
        print(
            "the token (shown once; keep it secret, pass it with --token-file or $SIDEMESH_TOKEN):"
        )
        print(token)
    return EXIT_OK


def _print(issued: Issued) -> None:
    print(f"wrote {issued.cert}")
    print(f"wrote {issued.key} (mode 0600)")
