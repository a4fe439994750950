"""The streamable-HTTP MCP endpoint of ``sidemesh serve``: the mesh, and each virtual server.

One listener (``mcp.http.listen``), one path per MCP server: ``mcp.http.path``
for the whole mesh, ``<path>/<name>`` (or its own ``path``) for each virtual
server. Each path is a :class:`~orchestrator.gateway.MeshMcpServer` behind the
official SDK's streamable-HTTP session manager: sessions (``Mcp-Session-Id``),
SSE streams, ``Last-Event-ID`` resumption (an in-memory event store), both
protocol eras, and DNS-rebinding protection (loopback hosts plus
``allowed_hosts``). A POST is answered with one JSON body unless its call may
need a stream (``_responses``).

Authorization (MCP's, OAuth 2.1 as a resource server): every request is
authenticated by the :class:`~orchestrator.gateway.Authenticator` first; a
refusal is ``401`` (``403`` for missing scopes) with ``WWW-Authenticate:
Bearer resource_metadata="…"`` pointing at the RFC 9728 document this
endpoint serves at ``/.well-known/oauth-protected-resource<path>``. A virtual
server bound to principals refuses the others with ``403``. A session
belongs to the principal that opened it: another principal presenting its
id gets ``404``, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from clients import AsyncMeshClient
from orchestrator._mcp_config import McpGatewaySettings
from orchestrator.gateway._auth import (
    AllowAll,
    Anonymous,
    Authenticator,
    Authorizer,
    JwtAuthenticator,
    Unauthenticated,
    metadata_path,
    protected_resource_metadata,
)
from orchestrator.gateway._event_store import MemoryEventStore
from orchestrator.gateway._responses import (
    JSON_POST,
    PerPostSessionManager,
    Sessions,
    parse,
    read_body,
    replay,
    wants_stream,
)
from orchestrator.gateway._server import PRINCIPAL_SCOPE_KEY, MeshMcpServer
from orchestrator.gateway._view import View

log = logging.getLogger("sidemesh.mcp")

SESSION_HEADER = b"mcp-session-id"
#: Sessions remembered for their owner check (the SDK's own limit is lower).
_MAX_OWNED_SESSIONS = 100_000


@dataclass
class _Endpoint:
    """One path: its MCP server, its session manager, who opened which session."""

    path: str
    view: View
    server: MeshMcpServer
    manager: StreamableHTTPSessionManager
    owners: dict[str, str]
    sessions: Sessions


class McpHttpEndpoint:
    """``start()`` binds the listener and serves; ``stop()`` ends the sessions and closes it."""

    def __init__(
        self,
        settings: McpGatewaySettings,
        mesh: AsyncMeshClient,
        *,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self._settings = settings
        self._mesh = mesh
        self._authorizer = authorizer or AllowAll()
        self._authenticator = authenticator
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._endpoints: list[_Endpoint] = []
        #: The listener's ``http://host:port`` once started.
        self.base_url = ""

    @property
    def urls(self) -> dict[str, str]:
        """Each MCP server's URL, by name (``sidemesh`` is the whole mesh)."""
        return {e.view.name: self.base_url + e.path for e in self._endpoints}

    def resource(self, path: str) -> str:
        """The resource URI (the tokens' audience) of the endpoint at ``path``."""
        configured = self._settings.auth.resource
        if configured:
            return configured.rstrip("/") + path.removeprefix(self._settings.http.path)
        return self.base_url + path

    def metadata_url(self, path: str) -> str:
        """Where clients find the protected-resource metadata of the endpoint at ``path``
        (RFC 9728: the well-known path inserted before the resource URI's path)."""
        resource = urlsplit(self.resource(path))
        return f"{resource.scheme}://{resource.netloc}{metadata_path(resource.path or '/')}"

    async def start(self) -> str:
        """Binds ``mcp.http.listen`` and starts serving; returns the base URL."""
        http = self._settings.http
        host, _, port = http.listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen for MCP on {http.listen}: {exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.base_url = f"http://{shown}:{bound_port}"
        if self._authenticator is None:
            self._authenticator = self._default_authenticator()
        app = self._app()
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", loop="none",
            timeout_graceful_shutdown=2, ws="none",
        )  # fmt: skip
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="mcp-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the MCP HTTP endpoint stopped while starting")
            await asyncio.sleep(0.01)
        log.info("MCP over streamable HTTP at %s", ", ".join(self.urls.values()))
        return self.base_url

    async def stop(self) -> None:
        """Ends the sessions and closes the listener."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is not None and task is not None:
            server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # -- the app -------------------------------------------------------------------------

    def _default_authenticator(self) -> Authenticator:
        auth = self._settings.auth
        if not auth.enabled:
            return Anonymous()
        return JwtAuthenticator(auth)

    def _security(self) -> TransportSecuritySettings:
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *self._settings.http.allowed_hosts]
        origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
        origins += [f"https://{h}" for h in self._settings.http.allowed_hosts]
        return TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)

    def _views(self) -> Iterator[tuple[str, View]]:
        settings = self._settings
        yield settings.http.path, View()
        for name, server in settings.servers.items():
            yield settings.server_path(name), View.of(name, server)

    def _app(self) -> Starlette:
        http = self._settings.http
        routes: list[Route] = []
        for path, view in self._views():
            server = MeshMcpServer(self._mesh, view, authorizer=self._authorizer)
            manager_cls = (
                PerPostSessionManager
                if http.responses == "auto"
                else (StreamableHTTPSessionManager)
            )
            manager = manager_cls(
                app=server.server,
                event_store=MemoryEventStore(http.event_history) if http.event_history else None,
                json_response=http.responses == "json",
                security_settings=self._security(),
                session_idle_timeout=http.session_idle_timeout,
            )
            endpoint = _Endpoint(path, view, server, manager, {}, Sessions())
            self._endpoints.append(endpoint)
            routes.append(Route(path, endpoint=_Guard(self, endpoint), methods=None))
            if self._settings.auth.enabled:
                routes.append(Route(metadata_path(path), endpoint=self._metadata(path)))

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with contextlib.AsyncExitStack() as stack:
                for endpoint in self._endpoints:
                    await stack.enter_async_context(endpoint.manager.run())
                follows = [asyncio.create_task(e.server.follow_catalog()) for e in self._endpoints]
                try:
                    yield
                finally:
                    for follow in follows:
                        follow.cancel()

        return Starlette(routes=routes, lifespan=lifespan)

    def _metadata(self, path: str) -> Any:
        async def metadata(request: Request) -> Response:
            document = protected_resource_metadata(self._settings.auth, self.resource(path))
            return JSONResponse(document, headers={"Cache-Control": "max-age=300"})

        return metadata

    # -- authentication ------------------------------------------------------------------

    async def guard(self, endpoint: _Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticates the request, checks the binding and the session's owner, serves it."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        assert self._authenticator is not None
        try:
            principal = await self._authenticator.authenticate(
                headers, self.resource(endpoint.path)
            )
        except Unauthenticated as refusal:
            await self._refuse(endpoint, refusal, scope, receive, send)
            return
        if not endpoint.view.admits(principal):
            response = JSONResponse(
                {"error": "forbidden", "error_description": f"{principal} may not use "
                 f"the MCP server {endpoint.view.name!r}"},
                status_code=403,
            )  # fmt: skip
            await response(scope, receive, send)
            return
        session = headers.get("mcp-session-id")
        if session is not None and endpoint.owners.get(session, principal) != principal:
            await Response("Session not found", status_code=404)(scope, receive, send)
            return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        capabilities: Any = None
        if scope["method"] == "POST" and self._settings.http.responses == "auto":
            body, complete = await read_body(receive)
            message = parse(body) if complete else None
            if isinstance(message, dict) and message.get("method") == "initialize":
                capabilities = (message.get("params") or {}).get("capabilities")
            # The session's own tasks start during its opening POST and keep its context:
            # that one is a stream, so they see the SDK's stream semantics.
            stream = (
                session is None
                or not complete
                or wants_stream(message, session, endpoint.sessions, endpoint.server.catalog)
            )
            JSON_POST.set(not stream)  # this request's task (and the handler it sends to)
            receive = replay(body, complete, receive)

        async def send_noting_session(message: Any) -> None:
            if message["type"] == "http.response.start" and session is None:
                for key, value in message.get("headers", ()):
                    if key.lower() == SESSION_HEADER:
                        opened = value.decode("latin-1")
                        if len(endpoint.owners) >= _MAX_OWNED_SESSIONS:
                            endpoint.owners.pop(next(iter(endpoint.owners)))
                        endpoint.owners[opened] = principal
                        endpoint.sessions.opened(opened, capabilities)
            await send(message)

        await endpoint.manager.handle_request(scope, receive, send_noting_session)

    async def _refuse(
        self, endpoint: _Endpoint, refusal: Unauthenticated, scope: Scope, receive: Receive,
        send: Send,
    ) -> None:  # fmt: skip
        challenge = f'Bearer resource_metadata="{self.metadata_url(endpoint.path)}"'
        if refusal.error:
            description = refusal.message.replace('"', "'").replace("\\", "/")
            challenge += f', error="{refusal.error}", error_description="{description}"'
        scopes = self._settings.auth.required_scopes
        if scopes:
            challenge += f', scope="{" ".join(scopes)}"'
        body = {"error": refusal.error or "unauthorized", "error_description": refusal.message}
        response = JSONResponse(
            body, status_code=refusal.status, headers={"WWW-Authenticate": challenge}
        )
        await response(scope, receive, send)


class _Guard:
    """The ASGI app of one path: the endpoint's guard in front of its session manager."""

    def __init__(self, owner: McpHttpEndpoint, endpoint: _Endpoint) -> None:
        self._owner = owner
        self._endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._owner.guard(self._endpoint, scope, receive, send)


class _QuietServer(uvicorn.Server):
    """Uvicorn inside the orchestrator: the orchestrator owns the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
