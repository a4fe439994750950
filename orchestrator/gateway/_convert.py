"""The mesh's protobuf messages as MCP types, for the MCP clients of the gateway."""

from __future__ import annotations

import base64
from typing import Any, Literal

import mcp_types as types
from google.protobuf import json_format

from sidemesh.core import struct_to_dict
from sidemesh.v1 import common_pb2, mcp_pb2, tool_pb2


def content(part: common_pb2.Content) -> types.ContentBlock:
    """A mesh content part as an MCP content block."""
    kind = part.WhichOneof("kind")
    if kind == "json":
        return types.TextContent(text=json_format.MessageToJson(part.json, indent=None))
    if kind == "blob":
        data, mime = base64.b64encode(part.blob.data).decode(), part.blob.mime_type
        if mime.startswith("image/"):
            return types.ImageContent(data=data, mime_type=mime)
        if mime.startswith("audio/"):
            return types.AudioContent(data=data, mime_type=mime)
        return types.EmbeddedResource(
            resource=types.BlobResourceContents(uri="sidemesh:blob", mime_type=mime, blob=data)
        )
    if kind == "resource_link":
        link = part.resource_link
        return types.ResourceLink(
            uri=link.uri, name=link.name or link.uri, title=link.title or None,
            description=link.description or None, mime_type=link.mime_type or None,
            size=link.size if link.HasField("size") else None,
        )  # fmt: skip
    if kind == "resource":
        return types.EmbeddedResource(resource=resource_contents(part.resource))
    return types.TextContent(text=part.text)


def resource_contents(
    res: common_pb2.ResourceContents,
) -> types.TextResourceContents | types.BlobResourceContents:
    """A resource's contents (text or bytes) as MCP resource contents."""
    mime = res.mime_type or None
    if res.WhichOneof("contents") == "blob":
        blob = base64.b64encode(res.blob).decode()
        return types.BlobResourceContents(uri=res.uri, mime_type=mime, blob=blob)
    return types.TextResourceContents(uri=res.uri, mime_type=mime, text=res.text)


def tool_result(result: tool_pb2.ToolResult) -> types.CallToolResult:
    """A tool's result as MCP's, ``is_error`` included."""
    structured = (
        struct_to_dict(result.structured_content) if result.HasField("structured_content") else None
    )
    return types.CallToolResult(
        content=[content(c) for c in result.content],
        structured_content=structured,
        is_error=result.is_error,
    )


def _annotations(message: Any) -> Any:
    return struct_to_dict(message.annotations) if message.HasField("annotations") else None


def resource(r: mcp_pb2.Resource, description: str | None = None) -> types.Resource:
    """A resource of an MCP plugin as an MCP resource."""
    return types.Resource(
        uri=r.uri, name=r.name or r.uri, title=r.title or None,
        description=description or r.description or None, mime_type=r.mime_type or None,
        size=r.size if r.HasField("size") else None, annotations=_annotations(r),
    )  # fmt: skip


def resource_template(
    t: mcp_pb2.ResourceTemplate, description: str | None = None
) -> types.ResourceTemplate:
    """A resource template of an MCP plugin as an MCP resource template."""
    return types.ResourceTemplate(
        uri_template=t.uri_template, name=t.name or t.uri_template, title=t.title or None,
        description=description or t.description or None, mime_type=t.mime_type or None,
        annotations=_annotations(t),
    )  # fmt: skip


def prompt(p: mcp_pb2.Prompt, name: str, description: str | None = None) -> types.Prompt:
    """A prompt of an MCP plugin, under its gateway ``name``."""
    return types.Prompt(
        name=name,
        title=p.title or None,
        description=description or p.description or None,
        arguments=[
            types.PromptArgument(
                name=a.name,
                title=a.title or None,
                description=a.description or None,
                required=a.required,
            )
            for a in p.arguments
        ],
    )


_ROLES: dict[int, Literal["user", "assistant"]] = {mcp_pb2.PROMPT_ROLE_ASSISTANT: "assistant"}


def prompt_result(result: mcp_pb2.GetPromptResponse) -> types.GetPromptResult:
    """A rendered prompt as MCP's."""
    return types.GetPromptResult(
        description=result.description or None,
        messages=[
            types.PromptMessage(role=_ROLES.get(m.role, "user"), content=content(m.content))
            for m in result.messages
        ],
    )


def completion(result: mcp_pb2.CompleteResponse) -> types.CompleteResult:
    """Completion suggestions as MCP's."""
    return types.CompleteResult(
        completion=types.Completion(
            values=list(result.values)[:100],
            total=result.total if result.HasField("total") else None,
            has_more=result.has_more or None,
        )
    )


def log_level(level: int) -> types.LoggingLevel:
    """A mesh log level as MCP's."""
    name = common_pb2.LogLevel.Name(level).removeprefix("LOG_LEVEL_").lower()  # type: ignore[arg-type]
    return name if name != "unspecified" else "info"  # type: ignore[return-value]
