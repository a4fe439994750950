"""The router: serves AgentService, ToolService and McpService by forwarding to sidecars.

This is the mesh's hot path. A request is parsed once, to find its target and
check it; the response stream is forwarded as the raw bytes the sidecar sent,
never decoded or re-encoded.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from clients import (
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SidemeshError,
    UnavailableError,
)
from orchestrator._catalog import Catalog, Entry
from orchestrator._events import EventBus
from orchestrator._plugin import PluginRuntime
from orchestrator._replica import Replica
from sidemesh.v1 import agent_pb2, mcp_pb2, mesh_pb2, tool_pb2

log = logging.getLogger("sidemesh.router")

AGENT_SERVICE = "sidemesh.v1.AgentService"
TOOL_SERVICE = "sidemesh.v1.ToolService"
MCP_SERVICE = "sidemesh.v1.McpService"

_HOP_HEADERS = frozenset(
    {"user-agent", "te", "content-type", "sidemesh-caller", "sidemesh-call-id"}
)
_OK = grpc.StatusCode.OK

# McpService: RPC name -> (request class, server streaming).
_MCP_METHODS: dict[str, tuple[Any, bool]] = {
    "GetServerInfo": (mcp_pb2.GetServerInfoRequest, False),
    "ListTools": (mcp_pb2.McpServiceListToolsRequest, False),
    "CallTool": (mcp_pb2.McpServiceCallToolRequest, True),
    "ListResources": (mcp_pb2.ListResourcesRequest, False),
    "ListResourceTemplates": (mcp_pb2.ListResourceTemplatesRequest, False),
    "ReadResource": (mcp_pb2.ReadResourceRequest, False),
    "ListPrompts": (mcp_pb2.ListPromptsRequest, False),
    "GetPrompt": (mcp_pb2.GetPromptRequest, False),
    "Complete": (mcp_pb2.CompleteRequest, False),
    "Watch": (mcp_pb2.WatchRequest, True),
}


class Admission:
    """Counts calls in flight across the whole orchestrator against the configured limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> None:
        """Admits one call, or raises ``RESOURCE_EXHAUSTED``."""
        if self.in_flight >= self.limit:
            raise ResourceExhaustedError(
                f"the mesh is at its limit of {self.limit} concurrent calls; retry shortly "
                "(operators: raise limits.max_concurrent_calls)",
                reason="CONCURRENCY_LIMIT",
                retry_delay=0.1,
            )
        self.in_flight += 1

    def leave(self) -> None:
        """Releases one call."""
        self.in_flight -= 1


def _bytes_field(number: int, payload: bytes) -> bytes:
    """Encodes a length-delimited protobuf field (a string or an embedded message)."""
    out = bytearray([number << 3 | 2])
    n = len(payload)
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def _string_field(number: int, value: str) -> bytes:
    """Encodes a string field. Appended to an encoded message, it overrides that field
    (protobuf keeps the last value of a scalar field and merges embedded messages)."""
    return _bytes_field(number, value.encode())


class Router:
    """Forwards calls to plugins; one per listener (``caller``: the plugin on a callback socket)."""

    def __init__(
        self,
        catalog: Catalog,
        plugins: Mapping[str, PluginRuntime],
        events: EventBus,
        admission: Admission,
        *,
        caller: PluginRuntime | None = None,
    ) -> None:
        self._catalog = catalog
        self._plugins = plugins
        self._events = events
        self._admission = admission
        self._caller = caller
        self._caller_name = caller.name if caller else ""
        self._allowed: dict[str, bool] = {}
        self._call_ids = _CallIds()

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the routed services to ``server``."""
        raw: Any = None  # no (de)serializer: the handler sees and returns bytes
        server.add_registered_method_handlers(
            AGENT_SERVICE,
            {
                "Invoke": grpc.unary_stream_rpc_method_handler(self._invoke, raw, raw),
                "Chat": grpc.stream_stream_rpc_method_handler(self._chat, raw, raw),
            },
        )
        server.add_registered_method_handlers(
            TOOL_SERVICE,
            {
                "ListTools": grpc.unary_unary_rpc_method_handler(
                    self._list_tools,
                    tool_pb2.ListToolsRequest.FromString,
                    tool_pb2.ListToolsResponse.SerializeToString,
                ),
                "CallTool": grpc.unary_stream_rpc_method_handler(self._call_tool, raw, raw),
            },
        )
        mcp: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for name, (request_cls, streaming) in _MCP_METHODS.items():
            handler = self._mcp_handler(f"/{MCP_SERVICE}/{name}", request_cls, streaming)
            factory = (
                grpc.unary_stream_rpc_method_handler
                if streaming
                else grpc.unary_unary_rpc_method_handler
            )
            mcp[name] = factory(handler, raw, raw)
        server.add_registered_method_handlers(MCP_SERVICE, mcp)

    # -- AgentService --------------------------------------------------------

    async def _invoke(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            request = _parse(agent_pb2.InvokeRequest, raw)
            entry = self._catalog.agent(request.agent, request.capability)
            self._authorize("agent", entry, "/sidemesh.v1.AgentService/Invoke")
        except SidemeshError as err:
            await err.abort(context)
        if request.agent != entry.name:
            raw += _string_field(1, entry.name)  # InvokeRequest.agent := plugin-local name
        async for message in self._forward(
            "/sidemesh.v1.AgentService/Invoke", "unary_stream", entry, raw, context
        ):
            yield message

    async def _chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            first = await anext(aiter(requests), None)
            if first is None:
                raise InvalidArgumentError(
                    "the chat ended before its first message (ChatRequest.start)"
                )
            start = _parse(agent_pb2.ChatRequest, first)
            if start.WhichOneof("message") != "start":
                raise InvalidArgumentError(
                    "a chat must begin with ChatRequest.start naming the agent",
                    reason="CHAT_NOT_STARTED",
                )
            entry = self._catalog.agent(start.start.agent, start.start.capability)
            self._authorize("agent", entry, "/sidemesh.v1.AgentService/Chat")
        except SidemeshError as err:
            await err.abort(context)
        if start.start.agent != entry.name:
            # ChatRequest.start.agent := plugin-local name (repeated message fields merge).
            first += _bytes_field(1, _string_field(1, entry.name))

        async def upstream() -> AsyncIterator[bytes]:
            yield first
            async for message in requests:
                yield message

        async for message in self._forward(
            "/sidemesh.v1.AgentService/Chat", "stream_stream", entry, upstream(), context
        ):
            yield message

    # -- ToolService ---------------------------------------------------------

    async def _list_tools(
        self, request: tool_pb2.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tool_pb2.ListToolsResponse:
        tools = self._catalog.tools(plugin=request.plugin)
        if self._caller is not None:
            tools = [t for t in tools if self._permitted("tool", t.qualified_name)]
        return tool_pb2.ListToolsResponse(tools=tools)

    async def _call_tool(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            request = _parse(tool_pb2.CallToolRequest, raw)
            entry = self._catalog.tool(request.tool)
            self._authorize("tool", entry, "/sidemesh.v1.ToolService/CallTool")
            entry.check_arguments(request.arguments)
        except SidemeshError as err:
            await err.abort(context)
        if request.tool != entry.name:
            raw += _string_field(1, entry.name)  # CallToolRequest.tool := plugin-local name
        async for message in self._forward(
            "/sidemesh.v1.ToolService/CallTool", "unary_stream", entry, raw, context
        ):
            yield message

    # -- McpService ----------------------------------------------------------

    def _mcp_handler(self, method: str, request_cls: Any, streaming: bool) -> Callable[..., Any]:
        async def resolve(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Entry[Any]:
            try:
                request = _parse(request_cls, raw)
                plugin = self._catalog.mcp_server(request.server)
                if isinstance(request, mcp_pb2.McpServiceCallToolRequest):
                    tool = self._catalog.tool(f"{plugin}/{request.name}")
                    self._authorize("tool", tool, method)
                    tool.check_arguments(request.arguments)
                    return tool
                return Entry(plugin, "", plugin, None)
            except SidemeshError as err:
                await err.abort(context)

        if streaming:

            async def stream(
                raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[bytes]:
                entry = await resolve(raw, context)
                async for message in self._forward(method, "unary_stream", entry, raw, context):
                    yield message

            return stream

        async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            entry = await resolve(raw, context)
            result = b""
            async for message in self._forward(method, "unary_unary", entry, raw, context):
                result = message
            return result

        return unary

    # -- permissions ---------------------------------------------------------

    def _permitted(self, kind: str, qualified: str) -> bool:
        key = f"{kind}:{qualified}"
        allowed = self._allowed.get(key)
        if allowed is None:
            assert self._caller is not None and self._caller.manifest is not None
            perms = self._caller.manifest.permissions
            patterns = perms.tools if kind == "tool" else perms.agents
            allowed = any(fnmatch.fnmatchcase(qualified, p) for p in patterns)
            self._allowed[key] = allowed
        return allowed

    def _authorize(self, kind: str, entry: Entry[Any], method: str) -> None:
        if self._caller is None or self._permitted(kind, entry.qualified):
            return
        field = "tools" if kind == "tool" else "agents"
        reason = (
            f"plugin {self._caller_name!r} may not call {kind} {entry.qualified!r}: add it "
            f"(or a pattern such as '{entry.plugin}/*') to permissions.{field} in "
            f"{self._caller_name}'s plugin.yaml"
        )
        self._events.emit(
            self._caller_name,
            "permission_denied",
            mesh_pb2.PermissionDenied(
                caller=self._caller_name, target=entry.qualified, method=method, reason=reason
            ),
            also=(entry.plugin,),
        )
        log.warning("permission denied: %s", reason)
        raise PermissionDeniedError(
            reason, reason="PERMISSION_DENIED", metadata={"caller": self._caller_name}
        )

    # -- forwarding ----------------------------------------------------------

    async def _forward(
        self,
        method: str,
        kind: str,
        entry: Entry[Any],
        payload: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        """Calls ``method`` on a ready replica of ``entry``'s plugin; yields its raw responses."""
        try:
            plugin = self._plugins[entry.plugin]
            replica = plugin.pick()
            self._admission.enter()
        except SidemeshError as err:
            await err.abort(context)
        call_id = self._call_ids.next()
        metadata = self._metadata(context, call_id)
        call = replica.method(method, kind)(
            payload, timeout=context.time_remaining(), metadata=metadata
        )
        replica.in_flight += 1
        watched = self._events.wants_call_events
        started = time.monotonic()
        if watched:
            self._call_started(entry, method, call_id, replica)
        code, details, count = _OK, "", 0
        try:
            if kind == "unary_unary":
                yield await call
                count = 1
            else:
                async for message in call:
                    count += 1
                    yield message
        except grpc.aio.AioRpcError as exc:
            code, details, trailers = await self._upstream_error(exc, plugin, replica)
            await context.abort(code, details, trailers)
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "cancelled by the caller"
            raise
        finally:
            if not call.done():
                call.cancel()
            replica.in_flight -= 1
            self._admission.leave()
            if watched or self._events.wants_call_events:
                self._call_ended(entry, method, call_id, code, details, started, count)

    async def _upstream_error(
        self, exc: grpc.aio.AioRpcError, plugin: PluginRuntime, replica: Replica
    ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
        """The error to give the caller for a failed call to a sidecar.

        A transport failure (the sidecar died or went away) becomes UNAVAILABLE
        with a message that says so; the plugin's own errors pass through.
        """
        code = exc.code()
        transport = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        if not transport and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            transport = await _exits_soon(replica, 0.25)
        if not transport:
            return code, exc.details() or "", tuple(exc.trailing_metadata() or ())
        died = replica.process is not None and replica.process.returncode is not None
        what = "exited" if died else "became unreachable"
        err = UnavailableError(
            f"plugin {plugin.name!r} replica {replica.index} {what} during the call "
            f"({exc.details()}); the call did not complete. The replica is being restarted: retry",
            reason="SIDECAR_UNAVAILABLE",
            metadata={"plugin": plugin.name, "replica": str(replica.index)},
            retry_delay=1.0,
        )
        return err.code, err.message, err.trailing_metadata()

    def _metadata(
        self, context: grpc.aio.ServicerContext[Any, Any], call_id: str
    ) -> tuple[tuple[str, str | bytes], ...]:
        out: list[tuple[str, str | bytes]] = [
            (k, v)
            for k, v in context.invocation_metadata() or ()
            if k not in _HOP_HEADERS and not k.startswith(("grpc-", ":"))
        ]
        out.append(("sidemesh-call-id", call_id))
        if self._caller_name:
            out.append(("sidemesh-caller", self._caller_name))
        return tuple(out)

    # -- events --------------------------------------------------------------

    def _call_started(self, entry: Entry[Any], method: str, call_id: str, replica: Replica) -> None:
        self._events.emit(
            entry.plugin,
            "call_started",
            mesh_pb2.CallStarted(
                call_id=call_id,
                method=method,
                target=entry.qualified,
                caller=self._caller_name,
                replica=replica.index,
            ),
            also=(self._caller_name,) if self._caller_name else (),
        )

    def _call_ended(
        self,
        entry: Entry[Any],
        method: str,
        call_id: str,
        code: grpc.StatusCode,
        details: str,
        started: float,
        count: int,
    ) -> None:
        ended = mesh_pb2.CallEnded(
            call_id=call_id,
            method=method,
            target=entry.qualified,
            caller=self._caller_name,
            code=code.value[0],
            message=details,
            responses=count,
        )
        ended.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
        self._events.emit(
            entry.plugin,
            "call_finished" if code == _OK else "call_failed",
            ended,
            also=(self._caller_name,) if self._caller_name else (),
        )


class _CallIds:
    """Short unique call ids: a per-process random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}-{self._n}"


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise InvalidArgumentError(
            f"the request is not a valid {cls.DESCRIPTOR.full_name} message"
        ) from None


async def _exits_soon(replica: Replica, within: float) -> bool:
    process = replica.process
    if process is None:
        return True
    if process.returncode is not None:
        return True
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        return False
    return True
