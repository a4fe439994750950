"""Sidemesh's native data plane: the orchestrator forwards in Rust and decides in Python.

A :class:`DataPlane` runs its own tokio runtime on its own threads. It owns the
listeners (client TCP/TLS and Unix sockets, plugins' callback sockets), forwards
gRPC calls over HTTP/2 as bytes (never re-encoded) to pooled, multiplexed
connections to replicas, and enforces deadlines, cancellation, message size and
admission limits, retries and per-try timeouts.

Python decides: for each *routed* call, once its first request message has
arrived, ``decide(call)`` is called **synchronously on a data plane thread**
(holding the GIL only for the call) and returns a :class:`Decision` or a
:class:`Refusal`. Calls whose first messages are in hand together are decided
back to back under one acquisition of the GIL (``stats()["decision_batches"]``).
``retry_pick`` and ``upstream_failed`` are called only when an attempt failed;
``verify_peer`` once per new Unix upstream connection made with ``verify=True``.
These callbacks must not block and must be thread-safe with respect to the
asyncio thread (they run on another thread; use ``loop.call_soon_threadsafe`` to
reach the event loop).

Every other path is forwarded as is to ``internal_address`` (the orchestrator's
own grpc.aio server), with trusted metadata set by the data plane — any
``sidemesh-*`` metadata a client sent is stripped first:

- ``sidemesh-principal``: the peer's principal (see :meth:`DataPlane.listen`);
- ``sidemesh-listener``: the listener id;
- ``sidemesh-peer``: the peer's address (``127.0.0.1:5555``,
  ``unix:pid=1,uid=2,gid=3``);
- ``sidemesh-caller``: the plugin, on a callback listener.

Finished routed calls are drained with :meth:`DataPlane.take_records`.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, Self, final

__all__ = [
    "Call",
    "DataPlane",
    "Decision",
    "Record",
    "Refusal",
    "RetryPolicy",
    "SpanAttributes",
    "TlsConfig",
]

# Type aliases exist in this stub only: import them under `if TYPE_CHECKING:`.
Kind = Literal["unary_unary", "unary_stream", "stream_stream"]
MetadataValue = str | bytes

@final
class Call:
    """One routed call, as ``decide`` sees it (read-only; cheap attribute access)."""

    @property
    def listener(self) -> str:
        """The id of the listener the call came in on."""
    @property
    def caller(self) -> str:
        """The plugin whose callback socket the call came in on; ``""`` on client listeners."""
    @property
    def principal(self) -> str:
        """Who is calling, from the transport (unforgeable): ``plugin:<name>`` on a
        callback listener; ``unix:uid:<uid>`` on a Unix socket; on TLS with a client
        certificate its first URI SAN as is (``spiffe://example.org/ns/x``), else
        ``dns:<first DNS SAN>``, else ``cn:<subject common name>``; else ``anonymous``."""
    @property
    def peer(self) -> str:
        """``127.0.0.1:5555`` (TCP, TLS) or ``unix:pid=<pid>,uid=<uid>,gid=<gid>``."""
    @property
    def peer_pid(self) -> int | None:
        """SO_PEERCRED pid of a Unix peer."""
    @property
    def peer_uid(self) -> int | None: ...
    @property
    def peer_gid(self) -> int | None: ...
    @property
    def path(self) -> str:
        """``/sidemesh.v1.ToolService/CallTool``."""
    @property
    def kind(self) -> Kind: ...
    @property
    def call_id(self) -> str:
        """The mesh's id for the call, sent upstream as ``sidemesh-call-id``."""
    @property
    def message(self) -> bytes | None:
        """The first request message (uncompressed protobuf bytes); ``None`` when the
        request ended before any message (refuse with the route's own message)."""
    @property
    def metadata(self) -> list[tuple[str, MetadataValue]]:
        """The request metadata (``sidemesh-*`` removed); ``-bin`` values as bytes.
        Built on each access: prefer :meth:`header` for one key."""
    def header(self, key: str) -> MetadataValue | None:
        """The last value of one metadata key, or ``None``."""
    @property
    def trace_id(self) -> str:
        """32 hex digits (the caller's trace when it sent a ``traceparent``); with
        tracing off, the caller's trace id or ``""``."""
    @property
    def server_span_id(self) -> str:
        """The data plane's SERVER span for the call (16 hex digits; ``""`` when not tracing)."""
    @property
    def parent_span_id(self) -> str:
        """The caller's span (the SERVER span's parent); ``""`` for a root."""
    @property
    def client_span_id(self) -> str:
        """The CLIENT span of the first attempt (the upstream's ``traceparent`` names it)."""
    @property
    def sampled(self) -> bool: ...

@final
class RetryPolicy:
    """How a forwarded call may be retried; make one per tool or route and reuse it.

    A failed attempt is retried on the replica ``retry_pick`` names only when safe:
    never after a response message reached the client; when the attempt provably
    never reached a sidecar (connect failed, REFUSED_STREAM, a stream above a
    GOAWAY's last stream id, an unknown replica key) for any call kind, a
    ``stream_stream`` call only while nothing beyond its first message was sent;
    otherwise (transport failure after reaching it, per-try timeout, a plugin
    status in ``retry_on``) only when ``idempotent`` and the request is a single
    message. Pauses between attempts are uniform in ``[0, min(backoff_max,
    backoff_base * 2**(n-1))]`` (full jitter) and must fit in the caller's deadline.
    """

    def __new__(
        cls,
        max_attempts: int = 1,
        *,
        idempotent: bool = False,
        per_try_timeout: float | None = None,
        backoff_base: float = 0.025,
        backoff_max: float = 0.25,
        retry_on: Sequence[int] = (14,),
    ) -> Self:
        """``max_attempts`` counts the first; ``per_try_timeout`` (seconds) runs from an
        attempt's start to its first response message; ``retry_on``: the plugin's own
        status codes an idempotent call is retried on (default UNAVAILABLE)."""
    @property
    def max_attempts(self) -> int: ...
    @property
    def idempotent(self) -> bool: ...
    @property
    def per_try_timeout(self) -> float | None: ...

@final
class SpanAttributes:
    """Span attributes serialized once (values: strings as they are, others as JSON,
    as the trace store keeps them). Make one per catalog entry and reuse it."""

    def __new__(cls, attributes: Mapping[str, str | int | float | bool]) -> Self: ...

@final
class Decision:
    """Forward the call to the replica ``upstream`` (a key given to ``set_upstream``)."""

    def __new__(
        cls,
        upstream: str,
        *,
        message: bytes | None = None,
        metadata: Iterable[tuple[str, MetadataValue]] | None = None,
        context: object = None,
        retry: RetryPolicy | None = None,
        span_attributes: SpanAttributes | None = None,
    ) -> Self:
        """``message``: the first message to send instead of the one received (a
        rewritten target); ``metadata``: extra request metadata for the upstream
        (bytes only for ``-bin`` keys); ``context``: any object, handed back to
        ``retry_pick``/``upstream_failed`` and in the call's :class:`Record`;
        ``retry``: default one attempt; ``span_attributes``: added to the call's
        SERVER span (``sidemesh.target``). Raises ``ValueError`` for bad metadata."""
    @property
    def upstream(self) -> str: ...
    @property
    def context(self) -> object: ...

@final
class Refusal:
    """End the call now: a trailers-only response with this status."""

    def __new__(cls, code: int, message: str, details: bytes | None = None) -> Self:
        """``code``: a gRPC error code (1-16); ``details``: an encoded
        ``google.rpc.Status``, sent as ``grpc-status-details-bin``."""
    @property
    def code(self) -> int: ...
    @property
    def message(self) -> str: ...

@final
class TlsConfig:
    """TLS for a TCP listener (rustls, ALPN h2), PEM file paths.

    With ``client_ca``: mTLS, client certificates must chain to it; without a
    certificate a client is refused (``require_client_cert``) or ``anonymous``.
    """

    def __new__(
        cls, cert: str, key: str, *, client_ca: str | None = None, require_client_cert: bool = True
    ) -> Self: ...

#: One attempt: (replica key, outcome, grpc code, start unix ns, end unix ns,
#: CLIENT span id ("" when not tracing), failure detail ("" when none)). Outcomes:
#: ``ok``, ``status`` (the plugin's own non-OK status), ``never_reached``,
#: ``transport``, ``per_try_timeout``, ``cancelled`` (by the caller), ``deadline``,
#: ``removed`` (``remove_upstream``), ``shutdown``, ``too_large``.
Attempt = tuple[str, str, int, int, int, str, str]

#: A trace store row: (trace_id, span_id, parent_span_id, name, service, kind (2 SERVER,
#: 3 CLIENT), start_ns, end_ns, error (0/1), status_message, attributes as a JSON object).
SpanRow = tuple[str, str, str, str, str, int, int, int, int, str, str]

@final
class Record:
    """One finished routed call (also calls refused by admission or ``decide``)."""

    context: Final[object]
    """The decision's context; ``None`` for a call refused before or by the decision."""
    listener: Final[str]
    caller: Final[str]
    principal: Final[str]
    path: Final[str]
    call_id: Final[str]
    code: Final[int]
    """The call's final gRPC status code, as the client saw it."""
    message: Final[str]
    requests: Final[int]
    """Request messages received."""
    responses: Final[int]
    """Response messages forwarded to the client (``sidemesh.messages.sent``)."""
    start_ns: Final[int]
    """Unix ns when the call arrived: the SERVER span's start."""
    decided_ns: Final[int]
    """When ``decide`` returned (the ``route`` event); 0 when no decision was made."""
    end_ns: Final[int]
    """When the call ended: the SERVER span's end."""
    trace_id: Final[str]
    server_span_id: Final[str]
    parent_span_id: Final[str]
    sampled: Final[bool]
    upstream: Final[str]
    """The replica of the last attempt ("" when none was tried)."""
    attempts: Final[list[Attempt]]
    """Every attempt in order: each is a CLIENT span (child of the SERVER span)."""

@final
class DataPlane:
    """The data plane. Every method is thread-safe; only :meth:`stop` blocks."""

    def __new__(
        cls,
        decide: Callable[[Call], Decision | Refusal],
        *,
        upstream_failed: Callable[[Any, str, str], tuple[int, str, bytes | None]],
        retry_pick: Callable[[Any, str, str], str | None],
        routes: Iterable[tuple[str, Kind]],
        verify_peer: Callable[[str, int, int], bool] | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_concurrent_calls: int = 1024,
        internal_address: str | None = None,
        admission_refusal: tuple[str, bytes | None] | None = None,
        tracing: bool = True,
        worker_threads: int = 1,
        max_records: int = 65_536,
        stream_window: int = 65_536,
        connection_window: int = 2 * 1024 * 1024,
        max_concurrent_streams: int = 20_000,
        service_name: str = "sidemesh-orchestrator",
        max_span_rows: int = 262_144,
        upstream_connections: int = 1,
        complete_after: Mapping[str, int] = ...,
    ) -> Self:
        """Starts the runtime (``worker_threads`` threads named ``sidemesh-dataplane``).

        - ``decide(call)``: see :class:`Call`; an exception or another return type
          ends the call INTERNAL ("the mesh failed to route the call ...").
        - ``upstream_failed(context, replica_key, detail)``: the (code, message,
          details) a client gets when the transport to a replica failed (connect
          refused, reset, GOAWAY, closed connection, replica removed). A plugin's own
          status passes through untouched and does not come here.
        - ``retry_pick(context, failed_replica_key, reason)``: another replica for a
          retry the policy allows, or ``None`` to give up (apply retry budgets here).
        - ``verify_peer(replica_key, pid, uid)``: for upstreams set with ``verify=True``.
        - ``routes``: the routed methods; any other path goes to ``internal_address``
          (``unix:/path`` or ``host:port``), or is UNIMPLEMENTED without one.
        - ``admission_refusal``: (message, details) of the RESOURCE_EXHAUSTED a call
          over ``max_concurrent_calls`` gets (default: the router's message, no details).
        - ``tracing``: make SERVER/CLIENT span ids and send the upstream a
          ``traceparent`` naming the CLIENT span; off: pass the caller's trace headers on.
        - ``stream_window``/``connection_window``: HTTP/2 receive windows on both
          sides; a stream buffers at most one ``stream_window`` per direction.
        - ``complete_after``: routed paths whose response stream ends, by contract, with
          one message (a ``result``) -> that message's first byte (its field's tag). Once
          it was forwarded whole, a transport failure before the trailers ends the call
          ``OK`` (the caller has it all); the attempt still counts as the replica's failure.
        - ``service_name``: ``service.name`` of the data plane's span rows.
        - ``upstream_connections``: HTTP/2 connections to each replica, streams spread
          over them round robin (1 measured as good as 4 against a Python sidecar).
        """
    def listen(
        self,
        address: str,
        *,
        listener_id: str,
        caller: str = "",
        tls: TlsConfig | None = None,
        unix_mode: int = 0o600,
        services: Iterable[str] | None = None,
    ) -> str:
        """Binds ``host:port`` (port 0: any; the real one is returned) or ``unix:/path``
        (a stale socket is replaced; one someone listens on is refused with OSError).
        ``caller``: this is that plugin's callback socket (principal ``plugin:<caller>``,
        ``sidemesh-caller`` set upstream). ``services``: the gRPC services served here;
        any other is UNIMPLEMENTED ("<service> is not served on this socket")."""
    def close_listener(self, listener_id: str) -> bool:
        """Stops accepting; connections get GOAWAY and finish their calls."""
    def set_upstream(
        self,
        replica_key: str,
        address: str,
        *,
        expected_uid: int | None = None,
        verify: bool = False,
        span_attributes: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        """Adds or replaces (ending the old one's calls) a replica at ``unix:/path`` or
        ``host:port``; setting the same again changes nothing. Unix only:
        ``expected_uid`` checks SO_PEERCRED's uid and ``verify`` asks ``verify_peer``
        on each new connection; a refused peer is a connect failure (never reached).
        ``span_attributes``: added to the CLIENT span of every attempt on it
        (``server.address``, ``network.transport``, ``sidemesh.plugin``, ...)."""
    def remove_upstream(self, replica_key: str) -> bool:
        """Closes the replica's connection; its calls end via ``upstream_failed``."""
    def in_flight(self, replica_key: str | None = None) -> int:
        """Attempts in flight on one replica, or routed calls in flight in all."""
    def upstream_stats(self, replica_key: str) -> tuple[int, int, int, int] | None:
        """(in flight, consecutive failures, successful attempts, failed attempts)."""
    def take_records(self) -> list[Record]:
        """The records of routed calls finished since the last call, oldest first (at
        most ``max_records`` are kept; see ``stats()["records_dropped"]``)."""
    def take_span_rows(self) -> list[SpanRow]:
        """The trace store rows of the data plane's spans since the last call (tracing
        on, sampled calls): per call a SERVER span (``rpc.system``, ``rpc.service``,
        ``rpc.method``, ``sidemesh.call_id``, ``sidemesh.caller``, the decision's
        ``span_attributes``, ``rpc.grpc.status_code``, ``sidemesh.messages.sent``) and
        a CLIENT span per attempt that opened a stream (the same ``rpc.*``, the
        upstream's ``span_attributes``, its status, ``sidemesh.attempt.outcome``).
        Errors have status message ``"<CODE_NAME>: <message>"``. Pass them to
        ``TraceStore.add_own`` as they are."""
    def stats(self) -> dict[str, int]:
        """``in_flight``, ``streams``, ``calls``, ``refused``, ``retries``,
        ``internal_calls``, ``records_waiting``, ``records_dropped``, ``span_rows_dropped``,
        ``decisions``, ``decision_batches``, ``decide_gil_wait_ns`` and
        ``decide_gil_held_ns`` (wall time the runtime threads spent waiting for the GIL,
        and holding it, for ``decide``)."""
    def stop(self, grace: float) -> int:
        """Stops accepting (Unix socket files removed), sends GOAWAY on every
        connection, waits up to ``grace`` seconds for streams in flight, then ends the
        rest UNAVAILABLE ("the mesh is shutting down: ..."). Blocks without the GIL:
        from asyncio, ``await asyncio.to_thread(dp.stop, grace)`` so that the internal
        server keeps answering meanwhile. Returns the streams that were cut off."""
