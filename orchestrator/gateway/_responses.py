"""JSON or SSE, per POST: the HTTP endpoint answers each request in the cheapest form it can.

Streamable HTTP lets the server answer a POST with one JSON body or with an
SSE stream. The stream is what carries a call's progress, its log messages
and the server's requests to the client; it also costs about a millisecond of
CPU per call here (the SSE response, its event-store entries). With
``mcp.http.responses: auto`` a POST gets the stream only when its call may
need it:

- ``tools/call`` with a progress token in ``_meta``;
- ``tools/call`` of an MCP plugin's tool when the session's client declared
  sampling, elicitation or roots (its server may ask);
- ``tools/call`` on a session that set a log level (``logging/setLevel``);
- ``subscriptions/listen`` (a stream by nature).

Everything else (lists, reads, prompts, completion, and calls that can only
end in their result) is answered with one JSON body. The SDK's transport
decides per session, so the endpoint's sessions use :class:`PerPostTransport`,
whose mode is the one :data:`JSON_POST` holds for the POST being served. The
POST that opens a session is a stream: the session's own tasks (its message
router) start there and keep that context, so they never drop a message.
Messages a JSON answer has no wire for are not sent: the gateway checks
``can_send_request`` before it sends a call's log lines.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.types import Message, Receive

from orchestrator.gateway._catalog import GatewayCatalog

#: Whether the POST being served is answered with one JSON body.
JSON_POST: ContextVar[bool] = ContextVar("sidemesh_mcp_json_post", default=False)
#: Bodies larger than this are passed on unread (the SDK refuses them).
MAX_BODY = 4 * 1024 * 1024
#: Sessions remembered (their client's capabilities); the oldest are forgotten first.
MAX_SESSIONS = 100_000


class PerPostTransport(StreamableHTTPServerTransport):
    """The SDK's streamable-HTTP transport, JSON or SSE as :data:`JSON_POST` says."""

    @property
    def is_json_response_enabled(self) -> bool:
        return JSON_POST.get()

    @is_json_response_enabled.setter
    def is_json_response_enabled(self, value: bool) -> None:
        """Ignored: the mode is decided per POST."""


class PerPostSessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, whose sessions answer JSON or SSE per POST."""

    def _admit_session(
        self, requestor: AuthorizationContext | None
    ) -> StreamableHTTPServerTransport | None:
        transport = super()._admit_session(requestor)
        if transport is not None:
            transport.__class__ = PerPostTransport  # adds the property, nothing else
        return transport


@dataclass
class Sessions:
    """What the endpoint knows of each session: whether its client may want a stream."""

    answers: dict[str, bool] = field(default_factory=dict)
    logging: set[str] = field(default_factory=set)

    def opened(self, session: str, capabilities: Any) -> None:
        if len(self.answers) >= MAX_SESSIONS:
            old = next(iter(self.answers))
            self.answers.pop(old)
            self.logging.discard(old)
        caps = capabilities if isinstance(capabilities, dict) else {}
        self.answers[session] = any(k in caps for k in ("sampling", "elicitation", "roots"))


def wants_stream(
    message: Any, session: str | None, sessions: Sessions, catalog: GatewayCatalog
) -> bool:
    """Whether this POST's JSON-RPC message needs an SSE answer (see the module docstring)."""
    if not isinstance(message, dict) or "id" not in message:
        return False  # a notification or a response: answered 202, no body
    method = message.get("method")
    raw = message.get("params")
    params: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if method == "subscriptions/listen":
        return True
    if method == "logging/setLevel" and session is not None:
        sessions.logging.add(session)
        return False
    if method != "tools/call":
        return False
    raw_meta = params.get("_meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    if "progressToken" in meta or (session is not None and session in sessions.logging):
        return True
    target = catalog.targets.get(str(params.get("name", "")))
    answers = sessions.answers.get(session, True) if session is not None else True
    return target is None or (target.mcp and answers)


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request's body (up to :data:`MAX_BODY`), and whether it was read whole."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > MAX_BODY:
            return b"".join(chunks), False


def replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` again first, then the rest of the request."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return again


def parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
