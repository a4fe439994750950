"""Who may use the orchestrator's own services: MeshService, reflection, the OTLP receiver.

The data plane passes every call it does not route to the orchestrator's
grpc.aio server on a private socket, with what the listener proved about the
peer as trusted metadata (``sidemesh-listener``, ``sidemesh-peer``,
``sidemesh-principal``, ``sidemesh-caller``; a client cannot send those, the
data plane strips them). :class:`OwnAccess` turns them (and the call's
``authorization``) into the caller's principal, and checks the method's kind
(``mesh.read``, ``mesh.admin``; health is open) before the handler runs.
Listings then show each principal only what it may call (:meth:`visible`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from orchestrator._access import Access
from orchestrator._authz import method_access
from orchestrator._principals import Principal, TransportIdentity
from orchestrator._routing import is_loopback_peer
from sidemesh.core import SidemeshError

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class OwnAccess(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes each call to the orchestrator's own services."""

    def __init__(self, access: Access | None, listeners: Mapping[str, str]) -> None:
        self._access = access
        self._listeners = listeners

    # -- who ------------------------------------------------------------------------

    def principal(self, metadata: Iterable[tuple[str, Any]]) -> Principal | None:
        """The caller of a call with ``metadata``; None without access control.

        Raises ``UNAUTHENTICATED`` when no principal can be told.
        """
        if self._access is None:
            return None
        pairs = [(k, v) for k, v in metadata]
        trusted = {k: str(v) for k, v in pairs if k.startswith("sidemesh-")}
        return self._access.authenticate(self._identity(trusted), pairs)

    def _identity(self, trusted: Mapping[str, str]) -> TransportIdentity:
        caller = trusted.get("sidemesh-caller")
        if caller:
            return TransportIdentity.plugin(caller)
        peer = trusted.get("sidemesh-peer", "")
        kind = self._listeners.get(trusted.get("sidemesh-listener", ""), "tcp")
        if kind == "unix":
            fields = dict(
                p.split("=", 1) for p in peer.removeprefix("unix:").split(",") if "=" in p
            )
            return TransportIdentity.unix(
                int(fields.get("uid", -1)), int(fields.get("gid", -1)), int(fields.get("pid", 0))
            )
        loopback = is_loopback_peer(peer)
        if kind == "tls":
            name = trusted.get("sidemesh-principal", "")
            return TransportIdentity.tls("" if name == "anonymous" else name, loopback=loopback)
        return TransportIdentity.tcp(loopback=loopback)

    def visible(
        self, context: Context, kind: str, items: list[T], key: Callable[[T], str]
    ) -> list[T]:
        """The ``items`` the caller of ``context`` may call (all without access control)."""
        if self._access is None:
            return items
        principal = self.principal(context.invocation_metadata() or ())
        assert principal is not None
        return self._access.policy.visible(principal, kind, items, key)

    def may(self, context: Context, kind: str, target: str) -> None:
        """Raises ``PERMISSION_DENIED`` unless the caller of ``context`` may call ``target``."""
        if self._access is None:
            return
        principal = self.principal(context.invocation_metadata() or ())
        assert principal is not None
        self._access.policy.check(principal, kind, target, kind)

    # -- the interceptor -----------------------------------------------------------

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if self._access is None or handler is None:
            return handler
        kind = method_access(details.method)
        if kind == "open":
            return handler
        metadata = details.invocation_metadata or ()
        try:
            principal = self.principal(metadata)
            assert principal is not None
            if kind.startswith("mesh.") and not principal.is_plugin:
                # (a plugin's use of the mesh API is MeshService's: its operator's grant)
                method = details.method.rpartition("/")[2]
                self._access.policy.check(principal, kind, method, method)
        except SidemeshError as err:
            return _refusing(handler, err)
        return handler


def _refusing(handler: Handler, err: SidemeshError) -> Handler:
    """A handler of the same shape as ``handler`` that ends the call with ``err``."""

    async def refuse(request: Any, context: Context) -> Any:
        await err.abort(context)

    async def refuse_stream(request: Any, context: Context) -> Any:
        await err.abort(context)
        yield  # pragma: no cover - an async generator, for streaming handlers

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        refuse_stream, handler.request_deserializer, handler.response_serializer
    )
