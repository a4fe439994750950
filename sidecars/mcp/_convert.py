"""MCP's types (``mcp_types``, pydantic) as the mesh's messages (``sidemesh.v1``).

Binary data arrives base64-encoded in MCP and leaves as raw bytes (gRPC
carries bytes natively); annotations and schemas become ``Struct``s; absent
optional fields stay unset.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import mcp_types as types
from google.protobuf import struct_pb2
from pydantic import BaseModel

from sidemesh.core import to_struct
from sidemesh.v1 import common_pb2, mcp_pb2, tool_pb2

_ROLES = {"user": mcp_pb2.PROMPT_ROLE_USER, "assistant": mcp_pb2.PROMPT_ROLE_ASSISTANT}


def _struct(value: Any) -> struct_pb2.Struct | None:
    """A Struct for a JSON object (a model is dumped with its wire names); None for nothing."""
    if value is None:
        return None
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True, mode="json", exclude_none=True)
    if not isinstance(value, dict):
        value = {"result": value}  # structured content may be any JSON value since 2026-07-28
    return to_struct(value)


def _bytes(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(data + "==")  # tolerate missing padding; raises if not base64


def resource_contents(
    contents: types.TextResourceContents | types.BlobResourceContents,
) -> common_pb2.ResourceContents:
    """Text or binary contents of a resource."""
    out = common_pb2.ResourceContents(uri=contents.uri, mime_type=contents.mime_type or "")
    if isinstance(contents, types.TextResourceContents):
        out.text = contents.text
    else:
        out.blob = _bytes(contents.blob)
    return out


def content(block: types.ContentBlock) -> common_pb2.Content:
    """One content block: text, image/audio (a blob with its MIME type), a link, a resource."""
    out = common_pb2.Content()
    if isinstance(block, types.TextContent):
        out.text = block.text
    elif isinstance(block, types.ImageContent | types.AudioContent):
        out.blob.CopyFrom(common_pb2.Blob(data=_bytes(block.data), mime_type=block.mime_type))
    elif isinstance(block, types.ResourceLink):
        out.resource_link.CopyFrom(
            common_pb2.ResourceLink(
                uri=block.uri,
                name=block.name,
                title=block.title or "",
                description=block.description or "",
                mime_type=block.mime_type or "",
                size=block.size,
            )
        )
    else:
        out.resource.CopyFrom(resource_contents(block.resource))
    annotations = _struct(block.annotations)
    if annotations is not None:
        out.annotations.CopyFrom(annotations)
    return out


def tool_result(result: types.CallToolResult) -> tool_pb2.ToolResult:
    """A tool's result: its content, structured content and ``is_error``."""
    out = tool_pb2.ToolResult(
        content=[content(c) for c in result.content], is_error=result.is_error
    )
    structured = _struct(result.structured_content)
    if structured is not None:
        out.structured_content.CopyFrom(structured)
    return out


def tool_descriptor(tool: types.Tool) -> tool_pb2.ToolDescriptor:
    """A tool's descriptor: MCP's title precedence (``title``, then ``annotations.title``)."""
    hints = tool.annotations
    out = tool_pb2.ToolDescriptor(
        name=tool.name,
        title=tool.title or (hints.title if hints is not None else None) or "",
        description=tool.description or "",
        input_schema=_struct(tool.input_schema),
        output_schema=_struct(tool.output_schema),
    )
    if hints is not None:
        out.annotations.CopyFrom(
            tool_pb2.ToolAnnotations(
                read_only=hints.read_only_hint,
                idempotent=hints.idempotent_hint,
                destructive=hints.destructive_hint,
                open_world=hints.open_world_hint,
            )
        )
    return out


def resource(item: types.Resource) -> mcp_pb2.Resource:
    """A resource the server offers."""
    return mcp_pb2.Resource(
        uri=item.uri,
        name=item.name,
        title=item.title or "",
        description=item.description or "",
        mime_type=item.mime_type or "",
        size=item.size,
        annotations=_struct(item.annotations),
    )


def resource_template(item: types.ResourceTemplate) -> mcp_pb2.ResourceTemplate:
    """A resource template (an RFC 6570 URI template)."""
    return mcp_pb2.ResourceTemplate(
        uri_template=item.uri_template,
        name=item.name,
        title=item.title or "",
        description=item.description or "",
        mime_type=item.mime_type or "",
        annotations=_struct(item.annotations),
    )


def prompt(item: types.Prompt) -> mcp_pb2.Prompt:
    """A prompt template with its arguments."""
    return mcp_pb2.Prompt(
        name=item.name,
        title=item.title or "",
        description=item.description or "",
        arguments=[
            mcp_pb2.PromptArgument(
                name=a.name,
                title=a.title or "",
                description=a.description or "",
                required=bool(a.required),
            )
            for a in item.arguments or ()
        ],
    )


def prompt_result(result: types.GetPromptResult) -> mcp_pb2.GetPromptResponse:
    """A rendered prompt: its messages in order."""
    return mcp_pb2.GetPromptResponse(
        description=result.description or "",
        messages=[
            mcp_pb2.PromptMessage(role=_ROLES.get(m.role, 0), content=content(m.content))  # type: ignore[arg-type]
            for m in result.messages
        ],
    )


def completion(result: types.CompleteResult) -> mcp_pb2.CompleteResponse:
    """Completion suggestions."""
    c = result.completion
    return mcp_pb2.CompleteResponse(values=c.values, total=c.total, has_more=bool(c.has_more))


def capabilities(caps: types.ServerCapabilities | None) -> mcp_pb2.McpCapabilities:
    """What the server declared it supports."""
    if caps is None:
        return mcp_pb2.McpCapabilities()
    tools, resources, prompts = caps.tools, caps.resources, caps.prompts
    return mcp_pb2.McpCapabilities(
        tools=tools is not None,
        tools_list_changed=bool(tools and tools.list_changed),
        resources=resources is not None,
        resources_subscribe=bool(resources and resources.subscribe),
        resources_list_changed=bool(resources and resources.list_changed),
        prompts=prompts is not None,
        prompts_list_changed=bool(prompts and prompts.list_changed),
        completions=caps.completions is not None,
        logging=caps.logging is not None,
    )


def server_info(
    implementation: types.Implementation | None,
    protocol_version: str,
    instructions: str | None,
    caps: types.ServerCapabilities | None,
    fallback_name: str,
) -> mcp_pb2.McpServerInfo:
    """The server's identity (``fallback_name`` when a 2026-era server gives none)."""
    return mcp_pb2.McpServerInfo(
        name=implementation.name if implementation is not None else fallback_name,
        version=implementation.version if implementation is not None else "",
        title=(implementation.title or "") if implementation is not None else "",
        protocol_version=protocol_version,
        instructions=instructions or "",
        capabilities=capabilities(caps),
    )


def progress(value: float, total: float | None, message: str | None) -> common_pb2.Progress:
    """A progress notification as a ``Progress`` event."""
    return common_pb2.Progress(progress=value, total=total, message=message or "")


def page(cursor: str | None) -> str:
    """``next_page_token`` from MCP's ``nextCursor``: empty on the last page."""
    return cursor or ""


def descriptors(tools: Sequence[types.Tool]) -> list[tool_pb2.ToolDescriptor]:
    """Descriptors of ``tools``, by name."""
    return [tool_descriptor(t) for t in sorted(tools, key=lambda t: t.name)]
