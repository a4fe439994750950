"""``McpService`` of the bridge: the MCP server's whole surface, request by request.

Lists pass MCP's opaque cursors through as page tokens. The ``server`` field
of each request is the orchestrator's routing key; the bridge ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
import mcp_types as types
from mcp import Client

from plugins_sdk.serving import CallInput
from sidecars.mcp import _convert as convert
from sidecars.mcp._asking import CallSlot, capabilities
from sidecars.mcp._calls import Context, call_timeout, server_chain, stream_tool_call, unary
from sidecars.mcp._errors import Lookup
from sidecars.mcp._link import ServerLink
from sidemesh.core import UnavailableError
from sidemesh.v1 import mcp_pb2, mcp_pb2_grpc

M = TypeVar("M", bound=types.Result)


def _page(token: str) -> types.PaginatedRequestParams:
    return types.PaginatedRequestParams(cursor=token or None)


async def _read_answers(
    requests: AsyncIterator[mcp_pb2.CallToolInteractiveRequest], slots: list[CallSlot]
) -> None:
    """Delivers the caller's answers to the call's slot until the caller closes its side."""
    with contextlib.suppress(Exception):  # the call ended: its stream says why
        async for message in requests:
            if message.WhichOneof("message") == "answer" and slots:
                slots[0].answer(message.answer)


class McpServicer(mcp_pb2_grpc.McpServiceServicer):
    """Serves one MCP server's tools, resources, prompts, completions and notifications."""

    def __init__(self, link: ServerLink) -> None:
        self._link = link
        self._chain = server_chain(link, "sidemesh.v1.McpService")

    async def GetServerInfo(
        self, request: mcp_pb2.GetServerInfoRequest, context: Context
    ) -> mcp_pb2.GetServerInfoResponse:
        """The server's identity, protocol version and capabilities."""
        return mcp_pb2.GetServerInfoResponse(info=self._link.info)

    async def ListTools(
        self, request: mcp_pb2.McpServiceListToolsRequest, context: Context
    ) -> mcp_pb2.McpServiceListToolsResponse:
        """One page of the server's tools, as the server pages them."""
        result = await self._ask(
            "ListTools", context, "tools/list",
            types.ListToolsRequest(params=_page(request.page_token)),
            types.ListToolsResult,
        )  # fmt: skip
        return mcp_pb2.McpServiceListToolsResponse(
            tools=[convert.tool_descriptor(t) for t in result.tools],
            next_page_token=convert.page(result.next_cursor),
        )

    async def CallTool(
        self, request: mcp_pb2.McpServiceCallToolRequest, context: Context
    ) -> AsyncIterator[mcp_pb2.McpServiceCallToolResponse]:
        """Calls a tool: progress events in order, then its result (``is_error`` included)."""
        calls = stream_tool_call(
            self._chain, self._link, context, request.name, request.arguments,
            mcp_pb2.McpServiceCallToolResponse,
        )  # fmt: skip
        async with aclosing(calls):
            async for message in calls:
                yield message

    async def CallToolInteractive(
        self, requests: AsyncIterator[mcp_pb2.CallToolInteractiveRequest], context: Context
    ) -> AsyncIterator[mcp_pb2.CallToolInteractiveResponse]:
        """A tool call whose caller answers the server's requests on the same stream."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("message") != "start":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "CallToolInteractive must begin with CallToolInteractiveRequest.start",
            )
        assert first is not None
        start = first.start
        slots: list[CallSlot] = []
        reader = asyncio.create_task(_read_answers(requests, slots))
        calls = stream_tool_call(
            self._chain, self._link, context, start.call.name, start.call.arguments,
            mcp_pb2.CallToolInteractiveResponse, answers=capabilities(start.client_capabilities),
            on_slot=slots.append, method="CallToolInteractive",
        )  # fmt: skip
        try:
            async with aclosing(calls):
                async for message in calls:
                    yield message
        finally:
            reader.cancel()

    async def ListResources(
        self, request: mcp_pb2.ListResourcesRequest, context: Context
    ) -> mcp_pb2.ListResourcesResponse:
        """One page of the server's resources."""
        result = await self._ask(
            "ListResources", context, "resources/list",
            types.ListResourcesRequest(params=_page(request.page_token)),
            types.ListResourcesResult,
        )  # fmt: skip
        return mcp_pb2.ListResourcesResponse(
            resources=[convert.resource(r) for r in result.resources],
            next_page_token=convert.page(result.next_cursor),
        )

    async def ListResourceTemplates(
        self, request: mcp_pb2.ListResourceTemplatesRequest, context: Context
    ) -> mcp_pb2.ListResourceTemplatesResponse:
        """One page of the server's resource templates."""
        result = await self._ask(
            "ListResourceTemplates", context, "resources/templates/list",
            types.ListResourceTemplatesRequest(params=_page(request.page_token)),
            types.ListResourceTemplatesResult,
        )  # fmt: skip
        return mcp_pb2.ListResourceTemplatesResponse(
            resource_templates=[convert.resource_template(t) for t in result.resource_templates],
            next_page_token=convert.page(result.next_cursor),
        )

    async def ReadResource(
        self, request: mcp_pb2.ReadResourceRequest, context: Context
    ) -> mcp_pb2.ReadResourceResponse:
        """A resource's contents, text or bytes; ``NOT_FOUND`` for an unknown URI."""
        result = await self._ask(
            "ReadResource", context, f"resources/read {request.uri}",
            types.ReadResourceRequest(params=types.ReadResourceRequestParams(uri=request.uri)),
            types.ReadResourceResult, lookup="resource",
        )  # fmt: skip
        return mcp_pb2.ReadResourceResponse(
            contents=[convert.resource_contents(c) for c in result.contents]
        )

    async def ListPrompts(
        self, request: mcp_pb2.ListPromptsRequest, context: Context
    ) -> mcp_pb2.ListPromptsResponse:
        """One page of the server's prompts."""
        result = await self._ask(
            "ListPrompts", context, "prompts/list",
            types.ListPromptsRequest(params=_page(request.page_token)),
            types.ListPromptsResult,
        )  # fmt: skip
        return mcp_pb2.ListPromptsResponse(
            prompts=[convert.prompt(p) for p in result.prompts],
            next_page_token=convert.page(result.next_cursor),
        )

    async def GetPrompt(
        self, request: mcp_pb2.GetPromptRequest, context: Context
    ) -> mcp_pb2.GetPromptResponse:
        """A prompt rendered with the arguments; ``NOT_FOUND`` for an unknown prompt."""
        params = types.GetPromptRequestParams(
            name=request.name, arguments=dict(request.arguments) or None
        )
        result = await self._ask(
            "GetPrompt", context, f"prompts/get {request.name}",
            types.GetPromptRequest(params=params),
            types.GetPromptResult, lookup="prompt",
        )  # fmt: skip
        return convert.prompt_result(result)

    async def Complete(
        self, request: mcp_pb2.CompleteRequest, context: Context
    ) -> mcp_pb2.CompleteResponse:
        """Completions of a prompt argument or a resource template variable."""
        ref: types.PromptReference | types.ResourceTemplateReference
        if request.WhichOneof("ref") == "resource_template":
            ref = types.ResourceTemplateReference(uri=request.resource_template)
        else:
            ref = types.PromptReference(name=request.prompt)
        context_args = dict(request.context_arguments)
        params = types.CompleteRequestParams(
            ref=ref,
            argument=types.CompletionArgument(
                name=request.argument_name, value=request.argument_value
            ),
            context=types.CompletionContext(arguments=context_args) if context_args else None,
        )
        result = await self._ask(
            "Complete", context, "completion/complete",
            types.CompleteRequest(params=params),
            types.CompleteResult,
        )  # fmt: skip
        return convert.completion(result)

    async def Watch(
        self, request: mcp_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[mcp_pb2.WatchResponse]:
        """The server's notifications until the client leaves or the plugin stops."""
        notifications = self._link.notifications

        async def handler(call: CallInput) -> AsyncGenerator[mcp_pb2.WatchResponse, None]:
            watcher = await notifications.watch(
                list(request.resource_uris), call_timeout(context, self._link), logs=request.logs
            )
            try:
                while (event := await watcher.next()) is not None:
                    yield event
            finally:
                await notifications.unwatch(watcher)
            raise UnavailableError(
                f"plugin {self._link.plugin!r} is stopping", reason="PLUGIN_STOPPING"
            )

        call = self._chain.input("Watch", context, what="Watch")
        async with aclosing(self._chain.stream(call, handler)) as responses:
            async for response in responses:
                yield response

    async def _ask(
        self,
        method: str,
        context: Context,
        what: str,
        mcp_request: Any,
        result_type: type[M],
        *,
        lookup: Lookup = "",
    ) -> M:
        """One MCP request in the call's SERVER span: sent through the link within the
        call's deadline, its result parsed as ``result_type``, failures as statuses."""

        async def send(client: Client, seconds: float) -> M:
            return await client.session.send_request(
                mcp_request, result_type, request_read_timeout_seconds=seconds
            )

        async def body(timeout: float) -> M:
            return await self._link.request(what, send, timeout, lookup=lookup)

        return await unary(self._chain, method, context, what, body, self._link)
