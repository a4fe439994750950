"""``MeshMcpServer``: the mesh (or a virtual server of it) as one MCP server.

Built on the official MCP SDK's low-level ``Server``, so clients of both
protocol eras work (the 2025 ``initialize`` handshake and the 2026 stateless
protocol), on stdio (``sidemesh mcp``) and streamable HTTP (``sidemesh
serve``). The whole MCP server surface: tools (the mesh's tools and agents),
resources, resource templates, subscriptions, prompts, completion, logging,
progress, cancellation, and list-changed notifications; the bridged
servers' sampling, elicitation and roots requests reach the client that made
the call (``_calls``).

Errors. A mesh error is an MCP error naming its status, except where MCP
wants a result the model can read: arguments that do not match a tool's
schema are a result with ``isError`` (2025-11-25 and later; JSON-RPC
``-32602`` before); an unknown resource is ``-32002`` (2025) or ``-32602``
(2026).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, KNOWN_PROTOCOL_VERSIONS

from clients import AsyncMeshClient
from orchestrator.gateway import _calls as calls
from orchestrator.gateway import _convert as convert
from orchestrator.gateway._auth import ANONYMOUS, AllowAll, Authorizer
from orchestrator.gateway._catalog import GatewayCatalog, Target
from orchestrator.gateway._tasks import Tasks
from orchestrator.gateway._view import View
from orchestrator.gateway._watches import Watches
from sidemesh.core import NotFoundError, SidemeshError
from sidemesh.v1 import common_pb2, mcp_pb2

log = logging.getLogger("sidemesh.mcp")

#: Seconds between catalog checks when no mesh event arrives.
POLL_INTERVAL = 5.0
#: Seconds to let a burst of mesh events settle before checking the catalog.
_SETTLE = 0.2
#: The retired MCP code for an unknown resource, which 2025 clients expect.
RESOURCE_NOT_FOUND = -32002
#: The first protocol version whose clients want schema errors as ``isError`` results.
_TOOL_ERRORS_SINCE = "2025-11-25"
#: MCP's log levels, lowest first.
_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
#: Where the HTTP endpoint puts the caller's principal in the ASGI scope.
PRINCIPAL_SCOPE_KEY = "sidemesh.principal"

Handler = Callable[..., Awaitable[Any]]


class MeshMcpServer:
    """An MCP server whose tools, resources and prompts are the mesh's (or a view's)."""

    def __init__(
        self,
        mesh: AsyncMeshClient,
        view: View | None = None,
        *,
        authorizer: Authorizer | None = None,
        principal: str = ANONYMOUS,
    ) -> None:
        self._mesh = mesh
        self.view = view or View()
        self.catalog = GatewayCatalog(mesh, self.view, authorizer or AllowAll())
        #: The principal of stdio clients (HTTP requests carry their own).
        self.principal = principal
        self._digest = ""
        #: 2025 sessions, told of list changes on their connection.
        self._sessions: set[ServerSession] = set()
        #: Resource URI -> 2025 sessions subscribed to it.
        self._subscribers: dict[str, set[ServerSession]] = {}
        #: 2025 sessions that set a log level (``logging/setLevel``), and that level.
        self._log_levels: dict[ServerSession, int] = {}
        self._bus = InMemorySubscriptionBus()
        self._listen = ListenHandler(self._bus)
        self.watches = Watches(mesh, self._on_watch_event)
        self._parked = calls.ParkedCalls()
        self._tasks = Tasks(self._run_task_call, self.principal_of)
        with warnings.catch_warnings():  # logging is deprecated in 2026, still served to 2025
            warnings.simplefilter("ignore")
            self.server: Server[Any] = _GatewayServer(
                self.view.name,
                version="0.1.0",
                title=self.view.title,
                instructions=(self.view.server.instructions if self.view.server else None)
                or "Tools, agents, resources and prompts of a Sidemesh mesh. A tool "
                "plugin/tool is named plugin.tool; an agent is agent_plugin.agent and takes "
                "'text'; a prompt plugin/prompt is plugin.prompt.",
                on_list_tools=self._list_tools,
                on_call_tool=self._call_tool,
                on_list_resources=self._list_resources,
                on_list_resource_templates=self._list_templates,
                on_read_resource=self._read_resource,
                on_subscribe_resource=self._subscribe,
                on_unsubscribe_resource=self._unsubscribe,
                on_subscriptions_listen=self._listen_handler,
                on_list_prompts=self._list_prompts,
                on_get_prompt=self._get_prompt,
                on_completion=self._complete,
                on_set_logging_level=self._set_level,
            )
        self.server.middleware.append(self._tasks.middleware)
        self._tasks.register(self.server)

    def initialization_options(self) -> InitializationOptions:
        """The capabilities this server declares: every list change, subscriptions, logging,
        tasks (the HTTP transport asks the server itself, so ``_GatewayServer`` answers too)."""
        return self.server.create_initialization_options()

    # -- following the mesh --------------------------------------------------------------

    async def refresh(self) -> bool:
        """Reads the mesh's tools and agents; returns whether the MCP tool list changed."""
        await self.catalog.refresh_tools()
        listed = [
            t.tool.model_dump(by_alias=True, mode="json") for t in self.catalog.targets.values()
        ]
        digest = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
        changed, self._digest = digest != self._digest, digest
        self.watches.follow(self.catalog.mcp_servers)
        return changed

    async def follow_catalog(self) -> None:
        """Tells clients ``tools/list_changed`` whenever the mesh's catalog changes."""
        wake = asyncio.Event()
        events = asyncio.create_task(self._watch_events(wake))
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
                await asyncio.sleep(_SETTLE if wake.is_set() else 0)
                wake.clear()
                was_listed = bool(self._digest)
                try:
                    changed = await self.refresh()
                except SidemeshError as err:
                    log.warning("cannot read the mesh's catalog: %s", err)
                    continue
                if changed and was_listed:
                    log.info("the mesh's tools changed: %d MCP tools", len(self.catalog.targets))
                    await self._announce(ToolsListChanged(), "send_tool_list_changed")
        finally:
            events.cancel()
            self.watches.close()
            self._parked.close()
            self._tasks.close()

    async def _watch_events(self, wake: asyncio.Event) -> None:
        """Wakes the catalog check on every plugin lifecycle event of the mesh."""
        while True:
            try:
                async for _ in self._mesh.watch_events(lifecycle_only=True):
                    wake.set()
            except SidemeshError as err:
                log.debug("mesh events ended: %s", err)
            await asyncio.sleep(POLL_INTERVAL)

    async def _on_watch_event(self, server: str, event: mcp_pb2.WatchResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "resources_list_changed":
            await self._announce(ResourcesListChanged(), "send_resource_list_changed")
        elif kind == "prompts_list_changed":
            await self._announce(PromptsListChanged(), "send_prompt_list_changed")
        elif kind == "log":
            await self._forward_log(server, event.log)
        elif kind == "resource_updated":
            uri = event.resource_updated.uri
            await self._bus.publish(ResourceUpdated(uri=uri))
            for session in list(self._subscribers.get(uri, ())):
                try:
                    await session.send_resource_updated(uri)
                except Exception:
                    self._subscribers[uri].discard(session)

    async def _forward_log(self, server: str, record: common_pb2.LogRecord) -> None:
        """A plugin's log outside calls, to the 2025 sessions whose level it reaches."""
        level = convert.log_level(record.level)
        rank = _LEVELS.index(level)
        data: Any = record.message
        for session, wanted in list(self._log_levels.items()):
            if rank < wanted:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await session.send_log_message(level, data, record.logger or server)
            except Exception:
                self._log_levels.pop(session, None)

    async def _announce(self, event: Any, method: str) -> None:
        await self._bus.publish(event)  # 2026 clients, on subscriptions/listen
        for session in list(self._sessions):  # 2025 clients, on their connection
            try:
                await getattr(session, method)()
            except Exception:
                self._sessions.discard(session)

    # -- who is asking -------------------------------------------------------------------

    def principal_of(self, ctx: ServerRequestContext[Any]) -> str:
        """The caller's principal: the HTTP endpoint's authentication, else stdio's."""
        request = ctx.request
        scope = getattr(request, "scope", None)
        if scope is not None and PRINCIPAL_SCOPE_KEY in scope:
            return str(scope[PRINCIPAL_SCOPE_KEY])
        return self.principal

    def _track(self, ctx: ServerRequestContext[Any]) -> None:
        if ctx.session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            self._sessions.add(ctx.session)

    # -- tools ---------------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self._track(ctx)
        try:
            await self.refresh()
        except SidemeshError as err:
            raise mcp_error(err) from None
        return types.ListToolsResult(tools=self.catalog.visible_tools(self.principal_of(ctx)))

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        principal = self.principal_of(ctx)
        target = await self._target(params.name)
        if target is None or not self.catalog.may_call(principal, target):
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        arguments = params.arguments or {}
        try:
            if target.agent:
                return await calls.invoke(self._mesh, ctx, target, arguments)
            if target.mcp:
                return await calls.call_mcp_tool(
                    self._mesh, ctx, target, params, self._parked, principal
                )
            return await calls.call_tool(self._mesh, ctx, target, arguments)
        except SidemeshError as err:
            if err.code.name == "INVALID_ARGUMENT" and _wants_tool_errors(ctx):
                return calls.error_result(f"Invalid arguments for {params.name}: {err.message}")
            raise mcp_error(err) from None

    async def _run_task_call(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """A task's call, in the background: its request has ended, so nothing it asks can be
        answered (the plain calls; the bridge refuses the server's requests)."""
        target = await self._target(params.name)
        if target is None or not self.catalog.may_call(self.principal_of(ctx), target):
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        arguments = params.arguments or {}
        try:
            if target.agent:
                return await calls.invoke(self._mesh, ctx, target, arguments)
            return await calls.call_tool(self._mesh, ctx, target, arguments)
        except SidemeshError as err:
            if err.code.name == "INVALID_ARGUMENT":
                return calls.error_result(f"Invalid arguments for {params.name}: {err.message}")
            raise mcp_error(err) from None

    async def _target(self, name: str) -> Target | None:
        target = self.catalog.targets.get(name)
        if target is None:
            with contextlib.suppress(SidemeshError):
                await self.refresh()
            target = self.catalog.targets.get(name)
        return target

    # -- resources -----------------------------------------------------------------------

    async def _list_resources(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        self._track(ctx)
        resources = await self._guard(self.catalog.list_resources(self.principal_of(ctx)))
        return types.ListResourcesResult(resources=resources)

    async def _list_templates(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        templates = await self._guard(self.catalog.list_templates(self.principal_of(ctx)))
        return types.ListResourceTemplatesResult(resource_templates=templates)

    async def _read_resource(
        self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        principal = self.principal_of(ctx)
        await self._guard(self.catalog.ensure_servers())
        for server in self.catalog.resource_candidates(uri, principal):
            try:
                contents = await self._mesh.read_resource(server, uri)
            except NotFoundError:
                continue
            except SidemeshError as err:
                raise mcp_error(err) from None
            return types.ReadResourceResult(
                contents=[convert.resource_contents(c) for c in contents]
            )
        legacy = ctx.session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
        raise MCPError(
            RESOURCE_NOT_FOUND if legacy else types.INVALID_PARAMS,
            f"Resource not found: {uri}",
            {"uri": uri},
        )

    async def _subscribe(
        self, ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        server = await self._server_of(uri, self.principal_of(ctx))
        sessions = self._subscribers.setdefault(uri, set())
        if ctx.session not in sessions:
            sessions.add(ctx.session)
            self.watches.subscribe(server, uri)
        return types.EmptyResult()

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        sessions = self._subscribers.get(uri, set())
        if ctx.session in sessions:
            sessions.discard(ctx.session)
            self.watches.unsubscribe(await self._server_of(uri, self.principal_of(ctx)), uri)
        return types.EmptyResult()

    async def _listen_handler(
        self, ctx: ServerRequestContext[Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        """2026 ``subscriptions/listen``: its resource URIs are watched while it lasts."""
        principal = self.principal_of(ctx)
        uris = list(params.notifications.resource_subscriptions or ())
        owners = [(await self._server_of(u, principal), u) for u in uris]
        for server, uri in owners:
            self.watches.subscribe(server, uri)
        try:
            return await self._listen(ctx, params)
        finally:
            for server, uri in owners:
                self.watches.unsubscribe(server, uri)

    async def _server_of(self, uri: str, principal: str) -> str:
        """The MCP plugin that offers ``uri``, for a subscription to it."""
        owner = await self._guard(self.catalog.resource_owner(uri, principal))
        if owner is None:
            raise MCPError(types.INVALID_PARAMS, f"Resource not found: {uri}")
        return str(owner)

    # -- prompts and completion ----------------------------------------------------------

    async def _list_prompts(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        self._track(ctx)
        prompts = await self._guard(self.catalog.refresh_prompts(self.principal_of(ctx)))
        return types.ListPromptsResult(prompts=prompts)

    async def _get_prompt(
        self, ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        target = await self._guard(self.catalog.prompt(params.name, self.principal_of(ctx)))
        if target is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        result = await self._guard(
            self._mesh.get_prompt(target.server, target.name, params.arguments or {})
        )
        return convert.prompt_result(result)

    async def _complete(
        self, ctx: ServerRequestContext[Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        principal = self.principal_of(ctx)
        ref = params.ref
        context = params.context.arguments if params.context and params.context.arguments else {}
        argument = params.argument
        if isinstance(ref, types.PromptReference):
            target = await self._guard(self.catalog.prompt(ref.name, principal))
            if target is None:
                raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {ref.name}")
            result = await self._guard(
                self._mesh.complete(
                    target.server,
                    argument.name,
                    argument.value,
                    prompt=target.name,
                    context=context,
                )
            )
            return convert.completion(result)
        template = str(ref.uri)
        server = self.catalog.template_server(template)
        if server is None:
            await self._guard(self.catalog.list_templates(principal))
            server = self.catalog.template_server(template)
        if server is None or not self.catalog.may_use_server(principal, server):
            raise MCPError(types.INVALID_PARAMS, f"Unknown resource template: {template}")
        result = await self._guard(
            self._mesh.complete(
                server, argument.name, argument.value, resource_template=template, context=context
            )
        )
        return convert.completion(result)

    async def _set_level(
        self, ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        """The session's level for the plugins' logs outside calls (a call's own logs are
        sent on its request as the bridged server sends them)."""
        for session in [
            s for s in self._log_levels if s.client_params is ctx.session.client_params
        ]:
            del self._log_levels[session]  # the same connection set a new level
        self._log_levels[ctx.session] = _LEVELS.index(params.level)
        return types.EmptyResult()

    @staticmethod
    async def _guard(awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except SidemeshError as err:
            raise mcp_error(err) from None


class _GatewayServer(Server[Any]):
    """The SDK's low-level server, declaring the gateway's capabilities whoever asks."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        every_change = NotificationOptions(
            tools_changed=True, prompts_changed=True, resources_changed=True
        )
        options = super().create_initialization_options(
            notification_options or every_change, experimental_capabilities, extensions
        )
        options.capabilities.tasks = Tasks.capability()
        return options


def _wants_tool_errors(ctx: ServerRequestContext[Any]) -> bool:
    """Whether the client's protocol reports schema errors as tool results (2025-11-25+)."""
    version = ctx.session.protocol_version
    known = KNOWN_PROTOCOL_VERSIONS
    return version not in known or known.index(version) >= known.index(_TOOL_ERRORS_SINCE)


def mcp_error(err: SidemeshError) -> MCPError:
    """A mesh error as an MCP error: bad input is invalid params, the rest an internal error."""
    message = f"{err.code.name}: {err.message}"  # the mesh's messages name the bad fields
    if err.code.name in ("INVALID_ARGUMENT", "NOT_FOUND"):
        return MCPError(types.INVALID_PARAMS, message)
    if err.code.name == "UNIMPLEMENTED":
        return MCPError(types.METHOD_NOT_FOUND, message)
    return MCPError(types.INTERNAL_ERROR, message)
