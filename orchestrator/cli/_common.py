"""What every client command shares: finding the mesh, running a call, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from clients import AsyncMeshClient, TlsOptions
from orchestrator._config import MeshConfig, load_config
from orchestrator._yaml_models import ConfigError
from orchestrator.cli._tracing import traced_command
from sidemesh.core import (
    DEFAULT_TCP_ADDRESS,
    SidemeshError,
    UnauthenticatedError,
    UnavailableError,
    running_mesh,
)

#: Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_CALL_FAILED = 1  # the call ended with a gRPC error (the message says which)
EXIT_USAGE = 2  # bad command line or bad input file
EXIT_TASK_FAILED = 3  # the tool returned is_error, or the agent's result is FAILED
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the call failed (gRPC status and message on stderr)
  2    usage error, or an invalid manifest/config
  3    the tool reported an error (is_error) or the agent's turn FAILED
  130  interrupted
"""


def add_mesh_options(parser: argparse.ArgumentParser) -> None:
    """``--address``, ``--config``, ``--timeout`` and ``--output`` for a client command."""
    parser.add_argument(
        "--address",
        "-a",
        help="the mesh's address, host:port or unix:/path (default: $SIDEMESH_ADDRESS, "
        "else the mesh running from the default state dir, else " + DEFAULT_TCP_ADDRESS + ")",
    )
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        help="find the mesh running with this sidemesh.yaml (its state_dir)",
    )
    parser.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    auth = parser.add_argument_group(
        "authentication",
        "how the command proves who it is (default: $SIDEMESH_TOKEN, $SIDEMESH_TOKEN_FILE, "
        "$SIDEMESH_TLS_CA/_CERT/_KEY; else the owner's token of the mesh running from the state "
        "dir, for its TCP address; on the Unix socket the mesh knows your uid)",
    )
    auth.add_argument(
        "--token", help="a bearer token (visible to other users in ps: prefer --token-file)"
    )
    auth.add_argument("--token-file", type=Path, help="a file holding a bearer token")
    auth.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA (PEM)")
    auth.add_argument("--tls-cert", type=Path, help="this client's TLS certificate (PEM), for mTLS")
    auth.add_argument("--tls-key", type=Path, help="the key of --tls-cert (PEM)")
    parser.add_argument(
        "--output", "-o", choices=("text", "json"), default="text", help="output format"
    )


def mesh_address(args: argparse.Namespace) -> str:
    """Where to reach the mesh, from the options, the environment or the running mesh."""
    if args.address:
        return str(args.address)
    if os.environ.get("SIDEMESH_ADDRESS") and args.config is None:
        return os.environ["SIDEMESH_ADDRESS"]
    config = _config(args)
    running = running_mesh(config.state_dir)
    addresses: list[str] = running["addresses"] if running else config.listen_addresses()
    return next((a for a in addresses if a.startswith("unix:")), addresses[0])


def mesh_client(args: argparse.Namespace, address: str) -> AsyncMeshClient:
    """A client of ``address`` with the command's timeout and credentials (see
    :func:`add_mesh_options`); exits with a usage error when they cannot be used."""
    tls: TlsOptions | None = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        try:
            tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key)
        except ValueError as exc:
            raise SystemExit(usage_error(f"--tls-cert and --tls-key: {exc}")) from None
    try:
        return AsyncMeshClient(
            address,
            timeout=args.timeout,
            token=args.token,
            token_file=args.token_file,
            tls=tls,
            state_dir=_config(args).state_dir,
        )
    except ValueError as exc:
        raise SystemExit(usage_error(str(exc))) from None


def _config(args: argparse.Namespace) -> MeshConfig:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(usage_error(str(exc))) from None


def run_client(
    args: argparse.Namespace,
    body: Callable[[AsyncMeshClient], Awaitable[int]],
    *,
    traced: str = "",
) -> int:
    """Runs ``body`` with a client; turns errors into a message on stderr and an exit code.

    With ``traced``, the command is a root span of that name, and its trace id
    is printed on stderr at the end.
    """
    address = mesh_address(args)
    client = mesh_client(args, address)

    async def main() -> int:
        async with client:
            return await body(client)

    if not traced:
        return _run(main(), client)
    with traced_command(traced, address, client) as span:
        code = _run(main(), client)
    trace_id = span.get_span_context().trace_id
    if trace_id and args.output != "json":
        print(f"trace {trace_id:032x}  (sidemesh trace {trace_id:032x})", file=sys.stderr)
    return code


def _run(main: Coroutine[Any, Any, int], client: AsyncMeshClient) -> int:
    try:
        return asyncio.run(main)
    except SidemeshError as err:
        print(f"sidemesh: {err.code.name}: {err.message}", file=sys.stderr)
        for violation in err.field_violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        if isinstance(err, UnauthenticatedError) or (
            isinstance(err, UnavailableError) and client.credentials.tls is not None
        ):
            print(f"  this command sent {client.credentials.describe()}", file=sys.stderr)
        return EXIT_CALL_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict with the .proto field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any, *, line: bool = False) -> None:
    """Prints a JSON document: indented, or on one line (``line``) for streams (JSON Lines)."""
    print(json.dumps(value, indent=None if line else 2, ensure_ascii=False), flush=line)


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control, format and separator characters
    (escape sequences, newlines, bidi overrides) shown as ``\\x1b``-style escapes."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        for c in text
    )


def usage_error(message: str) -> int:
    """Prints ``message`` as a usage error; returns the exit code for it."""
    print(f"sidemesh: {message}", file=sys.stderr)
    return EXIT_USAGE
