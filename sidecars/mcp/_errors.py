"""How a failed MCP request ends the gRPC call: JSON-RPC error codes as gRPC status codes.

| MCP | gRPC |
|---|---|
| ``-32602`` invalid params | ``INVALID_ARGUMENT`` (``NOT_FOUND``: see ``to_status``) |
| ``-32601`` method not found | ``UNIMPLEMENTED`` |
| ``-32002`` resource not found (before 2026) | ``NOT_FOUND`` |
| request timeout (the deadline) | ``DEADLINE_EXCEEDED`` |
| connection closed: the server exited | ``UNAVAILABLE`` (it is restarted) |
| any other JSON-RPC error | ``INTERNAL``, with the code and the server's message |
| an answer that is not valid MCP | ``INTERNAL`` |

A tool that fails at its task (``isError``) is a result, not an error: it never gets here.
"""

from __future__ import annotations

from typing import Literal

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from sidemesh.core import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    SidemeshError,
    UnavailableError,
    UnimplementedError,
)

#: Retired MCP code for an unknown resource, still sent by 2025-era servers.
RESOURCE_NOT_FOUND = -32002
#: What a request names, when it names a resource or prompt (see ``to_status``).
Lookup = Literal["", "resource", "prompt"]
#: Words of an invalid-params message that say the named thing does not exist.
_UNKNOWN_WORDS = ("not found", "unknown", "does not exist", "no such", "no prompt")
#: Seconds after which a call may succeed again once the server went away.
RESTART_DELAY = 1.0


def server_gone(what: str) -> UnavailableError:
    """The server exited (or closed its connection) during ``what``."""
    return UnavailableError(
        f"{what}: the MCP server exited or closed its connection; the bridge is restarting it, "
        "and the next call may succeed",
        reason="MCP_SERVER_GONE",
        retry_delay=RESTART_DELAY,
    )


def to_status(error: BaseException, what: str, *, lookup: Lookup = "") -> SidemeshError | None:
    """The ``SidemeshError`` for ``error`` raised while the bridge did ``what``.

    ``lookup``: the request names a resource or a prompt. Servers word an
    unknown one differently (``-32002``, or ``-32602`` "not found", "unknown
    resource", "Resource ... does not exist"); for a resource read every
    invalid-params answer is ``NOT_FOUND`` (its only parameter is the URI),
    for a prompt one whose message says the name is unknown. Returns ``None``
    for an unexpected error (a bug), which the caller reports as a sanitized
    ``UNKNOWN``.
    """
    if isinstance(error, SidemeshError):
        return error
    if isinstance(error, MCPError):
        return _from_mcp(error, what, lookup)
    if isinstance(error, TimeoutError):
        return DeadlineExceededError(f"{what}: the MCP server did not answer in time")
    if isinstance(
        error, anyio.BrokenResourceError | anyio.ClosedResourceError | ConnectionError | EOFError
    ):
        return server_gone(what)
    if isinstance(error, ValidationError):
        return InternalError(
            f"{what}: the MCP server's answer is not valid MCP: {_first_line(str(error))}",
            reason="MCP_BAD_ANSWER",
        )
    if isinstance(error, RuntimeError):  # the SDK's checks, e.g. structured content vs schema
        return InternalError(f"{what}: {error}", reason="MCP_BAD_ANSWER")
    return None


def _from_mcp(error: MCPError, what: str, lookup: Lookup) -> SidemeshError:
    code, message = error.code, error.message
    if code == types.CONNECTION_CLOSED:
        return server_gone(what)
    if code == types.REQUEST_TIMEOUT:
        return DeadlineExceededError(
            f"{what}: the MCP server did not answer within the deadline; the request was "
            "cancelled there",
            reason="MCP_REQUEST_TIMEOUT",
        )
    unknown = lookup == "resource" or (
        lookup == "prompt" and any(w in message.lower() for w in _UNKNOWN_WORDS)
    )
    if code == RESOURCE_NOT_FOUND or (unknown and code == types.INVALID_PARAMS):
        return NotFoundError(f"{what}: {message}", reason="MCP_NOT_FOUND")
    if code == types.INVALID_PARAMS:
        return InvalidArgumentError(
            f"{what}: the MCP server rejected the parameters: {message}",
            reason="MCP_INVALID_PARAMS",
        )
    if code == types.METHOD_NOT_FOUND:
        return UnimplementedError(
            f"{what}: the MCP server does not support it (method not found: {message})",
            reason="MCP_METHOD_NOT_FOUND",
        )
    return InternalError(
        f"{what}: the MCP server answered error {code}: {message}",
        reason="MCP_ERROR",
        metadata={"mcp_code": str(code)},
    )


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text
