"""The MCP servers of the mesh (``McpService``): resources, prompts, completion, notifications,
and tool calls whose server asks the caller something (sampling, elicitation, roots)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc

from clients._results import ToolCallResult
from clients._streams import ServerStream, _ResultStream, unary
from sidemesh.core import InternalError, struct_to_dict, to_struct
from sidemesh.v1 import common_pb2, mcp_pb2, mcp_pb2_grpc, mesh_pb2

Metadata = Sequence[tuple[str, str]]
#: Answers one server request (its MCP method and params) with an MCP result, as JSON.
#: Raise ``McpRequestError`` to answer with an MCP error instead.
ServerRequestHandler = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]
#: Pages read at most by the ``list_*`` helpers (a server that pages forever cannot hang them).
MAX_PAGES = 100


class McpRequestError(Exception):
    """Raised by a ``ServerRequestHandler``: the MCP error to answer the server with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class McpToolCall(_ResultStream[mcp_pb2.CallToolInteractiveResponse]):
    """One ``McpService.CallToolInteractive``: progress, logs and server requests, then the result.

    Iterating yields every event; a ``server_request`` must be answered with
    :meth:`answer` (``call_mcp_tool`` does it with its handler).
    """

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[Any, mcp_pb2.CallToolInteractiveResponse],
        description: str,
        start: mcp_pb2.CallToolInteractiveRequest,
    ) -> None:
        super().__init__(call, description)  # type: ignore[arg-type]
        self._stream_call = call
        self._start: mcp_pb2.CallToolInteractiveRequest | None = start
        self._result: ToolCallResult | None = None

    @property
    def result(self) -> ToolCallResult | None:
        """The tool's result once the stream has delivered it, else ``None``."""
        return self._result

    async def answer(
        self,
        request_id: str,
        result: Mapping[str, Any] | None = None,
        *,
        error: McpRequestError | None = None,
    ) -> None:
        """Answers the server request ``request_id`` with ``result`` (MCP JSON) or ``error``."""
        answer = mcp_pb2.McpClientAnswer(id=request_id)
        if error is not None:
            answer.error.code, answer.error.message = error.code, error.message
        else:
            answer.result.CopyFrom(to_struct(dict(result or {})))
        # The call may have ended meanwhile; reading the stream reports why.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._stream_call.write(mcp_pb2.CallToolInteractiveRequest(answer=answer))

    async def _read(self) -> mcp_pb2.CallToolInteractiveResponse | None:
        start, self._start = self._start, None
        if start is not None:  # the call's first message, sent on the first read
            with contextlib.suppress(grpc.RpcError):  # failed at once: the read says why
                await self._stream_call.write(start)
        return await super()._read()

    def _record(self, response: mcp_pb2.CallToolInteractiveResponse) -> None:
        if response.WhichOneof("event") == "result":
            self._result = ToolCallResult.from_proto(response.result)

    async def _expect_end(self) -> None:
        # Nothing more to answer after the result: close our side, then read the status.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._stream_call.done_writing()
        await super()._expect_end()


class McpCalls(Protocol):
    """What the MCP methods need from their client: stubs, deadlines, metadata."""

    def _mcp_stub(self) -> mcp_pb2_grpc.McpServiceAsyncStub: ...
    def _deadline(self, timeout: float | None) -> float | None: ...
    def _with(self, metadata: Metadata) -> tuple[tuple[str, str], ...]: ...
    async def list_plugins(
        self, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mesh_pb2.PluginStatus]: ...


class McpMethods:
    """``McpService`` calls of ``AsyncMeshClient``; ``server`` is the MCP plugin's name."""

    async def list_mcp_servers(
        self: McpCalls, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[str]:
        """The names of the mesh's MCP plugins (any state)."""
        plugins = await self.list_plugins(timeout=timeout, metadata=metadata)
        return sorted(p.name for p in plugins if p.mcp)

    async def mcp_server_info(
        self: McpCalls, server: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> mcp_pb2.McpServerInfo:
        """An MCP server's identity, protocol version and capabilities."""
        call = self._mcp_stub().GetServerInfo(
            mcp_pb2.GetServerInfoRequest(server=server),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return (await unary(call, f"GetServerInfo {server}")).info

    async def list_resources(
        self: McpCalls, server: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mcp_pb2.Resource]:
        """Every resource of ``server`` (all pages)."""
        out: list[mcp_pb2.Resource] = []
        stub, token = self._mcp_stub(), ""
        for _ in range(MAX_PAGES):
            call = stub.ListResources(
                mcp_pb2.ListResourcesRequest(server=server, page_token=token),
                timeout=self._deadline(timeout),
                metadata=self._with(metadata),
            )
            page = await unary(call, f"ListResources {server}")
            out.extend(page.resources)
            if not (token := page.next_page_token):
                break
        return out

    async def list_resource_templates(
        self: McpCalls, server: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mcp_pb2.ResourceTemplate]:
        """Every resource template of ``server`` (all pages)."""
        out: list[mcp_pb2.ResourceTemplate] = []
        stub, token = self._mcp_stub(), ""
        for _ in range(MAX_PAGES):
            call = stub.ListResourceTemplates(
                mcp_pb2.ListResourceTemplatesRequest(server=server, page_token=token),
                timeout=self._deadline(timeout),
                metadata=self._with(metadata),
            )
            page = await unary(call, f"ListResourceTemplates {server}")
            out.extend(page.resource_templates)
            if not (token := page.next_page_token):
                break
        return out

    async def read_resource(
        self: McpCalls,
        server: str,
        uri: str,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[common_pb2.ResourceContents]:
        """A resource's contents; ``NotFoundError`` for a URI the server does not know."""
        call = self._mcp_stub().ReadResource(
            mcp_pb2.ReadResourceRequest(server=server, uri=uri),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return list((await unary(call, f"ReadResource {uri}")).contents)

    async def list_prompts(
        self: McpCalls, server: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mcp_pb2.Prompt]:
        """Every prompt of ``server`` (all pages)."""
        out: list[mcp_pb2.Prompt] = []
        stub, token = self._mcp_stub(), ""
        for _ in range(MAX_PAGES):
            call = stub.ListPrompts(
                mcp_pb2.ListPromptsRequest(server=server, page_token=token),
                timeout=self._deadline(timeout),
                metadata=self._with(metadata),
            )
            page = await unary(call, f"ListPrompts {server}")
            out.extend(page.prompts)
            if not (token := page.next_page_token):
                break
        return out

    async def get_prompt(
        self: McpCalls,
        server: str,
        name: str,
        arguments: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> mcp_pb2.GetPromptResponse:
        """A prompt rendered with ``arguments``; ``NotFoundError`` for an unknown prompt."""
        call = self._mcp_stub().GetPrompt(
            mcp_pb2.GetPromptRequest(server=server, name=name, arguments=dict(arguments or {})),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return await unary(call, f"GetPrompt {name}")

    async def complete(
        self: McpCalls,
        server: str,
        argument: str,
        value: str = "",
        *,
        prompt: str = "",
        resource_template: str = "",
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> mcp_pb2.CompleteResponse:
        """Completions of a ``prompt``'s argument or a ``resource_template``'s variable."""
        request = mcp_pb2.CompleteRequest(
            server=server,
            argument_name=argument,
            argument_value=value,
            context_arguments=dict(context or {}),
        )
        if resource_template:
            request.resource_template = resource_template
        else:
            request.prompt = prompt
        call = self._mcp_stub().Complete(
            request, timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return await unary(call, f"Complete {argument}")

    def watch_mcp(
        self: McpCalls,
        server: str,
        resource_uris: Sequence[str] = (),
        *,
        logs: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ServerStream[mcp_pb2.WatchResponse]:
        """Streams ``server``'s list changes, updates of ``resource_uris`` and (``logs``) its
        log messages outside calls; open-ended."""
        call = self._mcp_stub().Watch(
            mcp_pb2.WatchRequest(server=server, resource_uris=list(resource_uris), logs=logs),
            timeout=timeout,
            metadata=self._with(metadata),
        )
        return ServerStream(call, f"Watch {server}")

    def call_mcp_tool_stream(
        self: McpCalls,
        server: str,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        sampling: bool = False,
        elicitation: bool = False,
        roots: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> McpToolCall:
        """Starts an MCP tool call whose server requests come back to the caller to answer.

        ``sampling``, ``elicitation``, ``roots``: which server requests the
        caller can answer; the bridge refuses the others for it.
        """
        start = mcp_pb2.CallToolInteractiveStart(
            call=mcp_pb2.McpServiceCallToolRequest(
                server=server, name=name, arguments=to_struct(dict(arguments or {}))
            ),
            client_capabilities=mcp_pb2.McpClientCapabilities(
                sampling=sampling, elicitation=elicitation, roots=roots
            ),
        )
        call = self._mcp_stub().CallToolInteractive(
            timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return McpToolCall(
            call, f"MCP tool {server}/{name}", mcp_pb2.CallToolInteractiveRequest(start=start)
        )

    async def call_mcp_tool(
        self: McpCalls,
        server: str,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        on_server_request: ServerRequestHandler | None = None,
        on_event: Callable[[mcp_pb2.CallToolInteractiveResponse], Awaitable[None]] | None = None,
        sampling: bool = False,
        elicitation: bool = False,
        roots: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ToolCallResult:
        """Calls an MCP tool, answering its server's requests with ``on_server_request``.

        ``on_event`` sees progress and log events. Without a handler, declare
        no capability: the bridge then refuses the server's requests itself.
        """
        stream = McpMethods.call_mcp_tool_stream(
            self, server, name, arguments, sampling=sampling, elicitation=elicitation,
            roots=roots, timeout=timeout, metadata=metadata,
        )  # fmt: skip
        try:
            async for event in stream:
                if event.WhichOneof("event") == "server_request":
                    await _answer(stream, event.server_request, on_server_request)
                elif on_event is not None:
                    await on_event(event)
        finally:
            stream.cancel()
        if stream.result is None:  # pragma: no cover - the stream raises before this
            raise InternalError(f"{stream.description} ended without a result event")
        return stream.result


async def _answer(
    stream: McpToolCall, request: mcp_pb2.McpServerRequest, handler: ServerRequestHandler | None
) -> None:
    if handler is None:
        error = McpRequestError(-32601, f"this client cannot answer {request.method}")
        await stream.answer(request.id, error=error)
        return
    try:
        result = await handler(request.method, struct_to_dict(request.params))
    except McpRequestError as error:
        await stream.answer(request.id, error=error)
        return
    await stream.answer(request.id, result)
