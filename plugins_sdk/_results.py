"""What a tool returns, and how each kind of return value becomes a ``ToolResult``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pydantic_core

from plugins_sdk._schema import output_schema
from sidemesh.core import dict_to_struct, jsonable
from sidemesh.v1 import common_pb2, tool_pb2

_OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class Blob:
    """Binary content with its MIME type, for example an image a tool produced."""

    data: bytes
    mime_type: str = _OCTET_STREAM


#: One part of a result's content: text, raw bytes, a :class:`Blob` or a ``Content`` message.
ContentPart = str | bytes | bytearray | Blob | common_pb2.Content


@dataclass(frozen=True)
class ToolResult:
    """A tool's result in full: return it for complete control over what the caller gets."""

    content: Sequence[ContentPart] = ()
    structured: Mapping[str, Any] | None = None
    is_error: bool = False

    def to_proto(self) -> tool_pb2.ToolResult:
        """The ``sidemesh.v1.ToolResult`` message."""
        result = tool_pb2.ToolResult(content=[content_part(p) for p in self.content])
        if self.structured is not None:
            result.structured_content.CopyFrom(dict_to_struct(jsonable(self.structured)))
        result.is_error = self.is_error
        return result


class ToolError(Exception):
    """Raised by a tool that fails at its task (a bad input value, a missing file).

    The caller gets a normal result with ``is_error`` set and this message as its
    text, which a model can read and act on; it is not a gRPC error.
    """

    def __init__(self, message: str, *, structured: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.structured = structured

    def to_proto(self) -> tool_pb2.ToolResult:
        """The error result the caller receives."""
        return ToolResult([self.message], self.structured, is_error=True).to_proto()


def content_part(part: ContentPart) -> common_pb2.Content:
    """One content part as a ``Content`` message."""
    if isinstance(part, str):
        return common_pb2.Content(text=part)
    if isinstance(part, bytes | bytearray):
        return common_pb2.Content(blob=common_pb2.Blob(data=bytes(part), mime_type=_OCTET_STREAM))
    if isinstance(part, Blob):
        return common_pb2.Content(blob=common_pb2.Blob(data=part.data, mime_type=part.mime_type))
    if isinstance(part, common_pb2.Content):
        return part
    raise TypeError(f"cannot use {type(part).__name__} as result content")


#: Return types that are not structured output.
_UNSTRUCTURED: tuple[type, ...] = (str, bytes, bytearray, Blob, ToolResult, common_pb2.Content)


@dataclass
class ResultConverter:
    """Turns one tool's return values into results; built once, from its return annotation.

    ``str`` is text, ``bytes`` and :class:`Blob` are binary content, a
    :class:`ToolResult` is used as is, and anything else (dicts, models, lists,
    numbers, booleans) is structured content, non-objects wrapped as
    ``{"result": value}``, plus the same JSON as text.
    """

    annotation: Any
    output_schema: dict[str, Any] = field(init=False)
    _wrap: bool = field(init=False)
    _adapter: pydantic.TypeAdapter[Any] | None = field(init=False)

    def __post_init__(self) -> None:
        self.output_schema, self._wrap = output_schema(self.annotation, _UNSTRUCTURED)
        self._adapter = pydantic.TypeAdapter(self.annotation) if self.output_schema else None

    def convert(self, value: object) -> tool_pb2.ToolResult:
        """The result message for ``value``."""
        if isinstance(value, str):
            return tool_pb2.ToolResult(content=[common_pb2.Content(text=value)])
        if isinstance(value, ToolResult):
            return value.to_proto()
        if value is None:
            return tool_pb2.ToolResult()
        if isinstance(value, bytes | bytearray | Blob | common_pb2.Content):
            return tool_pb2.ToolResult(content=[content_part(value)])
        if self._adapter is not None:
            plain = self._adapter.dump_python(value, mode="json", warnings=False)
            wrap = self._wrap
        else:
            plain = jsonable(value)
            wrap = not isinstance(plain, dict)
        structured = dict_to_struct({"result": plain} if wrap else plain)
        text = pydantic_core.to_json(plain).decode()
        return tool_pb2.ToolResult(
            content=[common_pb2.Content(text=text)], structured_content=structured
        )
