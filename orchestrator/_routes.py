"""The routed RPCs: how each request names its target, and how it is rewritten for the sidecar.

Resolving parses the call's first request message once (the only payload the
orchestrator reads), finds the target in the catalog, checks the caller may
call it and that tool arguments match the schema, and rewrites the target to
the plugin-local name by appending one field to the raw bytes instead of
re-encoding the message. The data plane forwards every other message as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from google.protobuf.message import DecodeError

from orchestrator._catalog import Catalog, Entry
from sidemesh.core import InvalidArgumentError
from sidemesh.v1 import agent_pb2, mcp_pb2, tool_pb2

AGENT_SERVICE = "sidemesh.v1.AgentService"
TOOL_SERVICE = "sidemesh.v1.ToolService"
MCP_SERVICE = "sidemesh.v1.McpService"


class Resolving(Protocol):
    """What resolving needs: the catalog and the caller's permission check."""

    catalog: Catalog

    def authorize(self, kind: str, entry: Entry[Any], method: str) -> None: ...


#: How a route's messages flow (the data plane's word for it).
Kind = Literal["unary_unary", "unary_stream", "stream_stream"]
#: (the decision's view of the call, the first message) -> (target, first message to send).
Resolver = Callable[[Resolving, bytes], tuple[Entry[Any], bytes]]


@dataclass(frozen=True, slots=True)
class Route:
    """One routed RPC: its path, how to call the sidecar, how to find the target."""

    service: str
    method: str
    kind: Kind
    resolve: Resolver
    #: The first byte (field tag) of the response that ends the stream by contract (a
    #: ``result``), for streams that have one: once it was forwarded, the call is complete.
    final_tag: int | None = None

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


#: Routes by their gRPC path (filled below).
BY_PATH: dict[str, Route] = {}


def _tag(number: int) -> int:
    """The first byte of an encoded message whose first field is embedded message ``number``."""
    return number << 3 | 2


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


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise InvalidArgumentError(
            f"the request is not a valid {cls.DESCRIPTOR.full_name} message"
        ) from None


def _resolve_invoke(router: Resolving, raw: bytes) -> tuple[Entry[Any], bytes]:
    request = _parse(agent_pb2.InvokeRequest, raw)
    entry = router.catalog.agent(request.agent, request.capability)
    router.authorize("agent", entry, "Invoke")
    if request.agent != entry.name:
        raw += _string_field(1, entry.name)  # InvokeRequest.agent := plugin-local name
    return entry, raw


def _resolve_chat(router: Resolving, first: bytes) -> tuple[Entry[Any], bytes]:
    start = _parse(agent_pb2.ChatRequest, first)
    if start.WhichOneof("message") != "start":
        raise InvalidArgumentError(
            "a chat must begin with ChatRequest.start naming the agent", reason="CHAT_NOT_STARTED"
        )
    entry = router.catalog.agent(start.start.agent, start.start.capability)
    router.authorize("agent", entry, "Chat")
    if start.start.agent != entry.name:
        # ChatRequest.start.agent := plugin-local name (repeated message fields merge).
        first += _bytes_field(1, _string_field(1, entry.name))
    return entry, first


def _resolve_call_tool(router: Resolving, raw: bytes) -> tuple[Entry[Any], bytes]:
    request = _parse(tool_pb2.CallToolRequest, raw)
    entry = router.catalog.tool(request.tool)
    router.authorize("tool", entry, "CallTool")
    entry.check_arguments(request.arguments)
    if request.tool != entry.name:
        raw += _string_field(1, entry.name)  # CallToolRequest.tool := plugin-local name
    return entry, raw


def _mcp_resolver(request_cls: Any) -> Resolver:
    def resolve(router: Resolving, raw: bytes) -> tuple[Entry[Any], bytes]:
        request = _parse(request_cls, raw)
        plugin = router.catalog.mcp_server(request.server)
        if isinstance(request, mcp_pb2.McpServiceCallToolRequest):
            tool = router.catalog.tool(f"{plugin}/{request.name}")
            router.authorize("tool", tool, "CallTool")
            tool.check_arguments(request.arguments)
            return tool, raw
        entry: Entry[Any] = Entry(plugin, "", plugin, None)
        router.authorize("mcp", entry, request_cls.DESCRIPTOR.name.removesuffix("Request"))
        return entry, raw

    return resolve


def _resolve_call_tool_interactive(router: Resolving, first: bytes) -> tuple[Entry[Any], bytes]:
    request = _parse(mcp_pb2.CallToolInteractiveRequest, first)
    if request.WhichOneof("message") != "start":
        raise InvalidArgumentError(
            "CallToolInteractive must begin with CallToolInteractiveRequest.start",
            reason="CALL_NOT_STARTED",
        )
    call = request.start.call
    plugin = router.catalog.mcp_server(call.server)
    tool = router.catalog.tool(f"{plugin}/{call.name}")
    router.authorize("tool", tool, "CallTool")
    tool.check_arguments(call.arguments)
    return tool, first


#: What a call that ended before its first message is told, per streaming route.
NO_FIRST_MESSAGE = {
    "Chat": "the chat ended before its first message (ChatRequest.start)",
    "CallToolInteractive": "the call ended before its first message (start)",
}

ROUTES = [
    Route(AGENT_SERVICE, "Invoke", "unary_stream", _resolve_invoke, _tag(7)),  # result = 7
    Route(AGENT_SERVICE, "Chat", "stream_stream", _resolve_chat),
    Route(TOOL_SERVICE, "CallTool", "unary_stream", _resolve_call_tool, _tag(3)),  # result = 3
    *(
        Route(
            MCP_SERVICE,
            name,
            "unary_stream" if streaming else "unary_unary",
            _mcp_resolver(cls),
            _tag(3) if name == "CallTool" else None,
        )
        for name, cls, streaming in (
            ("GetServerInfo", mcp_pb2.GetServerInfoRequest, False),
            ("ListTools", mcp_pb2.McpServiceListToolsRequest, False),
            ("CallTool", mcp_pb2.McpServiceCallToolRequest, True),
            ("ListResources", mcp_pb2.ListResourcesRequest, False),
            ("ListResourceTemplates", mcp_pb2.ListResourceTemplatesRequest, False),
            ("ReadResource", mcp_pb2.ReadResourceRequest, False),
            ("ListPrompts", mcp_pb2.ListPromptsRequest, False),
            ("GetPrompt", mcp_pb2.GetPromptRequest, False),
            ("Complete", mcp_pb2.CompleteRequest, False),
            ("Watch", mcp_pb2.WatchRequest, True),
        )
    ),
    Route(MCP_SERVICE, "CallToolInteractive", "stream_stream", _resolve_call_tool_interactive),
]
BY_PATH.update((route.path, route) for route in ROUTES)
