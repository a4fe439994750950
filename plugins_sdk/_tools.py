"""A registered tool: its descriptor, validator and result converter, built once at decoration."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from plugins_sdk._context import ToolContext
from plugins_sdk._results import ResultConverter, ToolError
from plugins_sdk._schema import Arguments, read_signature, type_hints
from sidemesh.core import to_struct
from sidemesh.v1 import tool_pb2


class ToolSpec:
    """One tool of a plugin, ready to be called.

    Everything that depends only on the function (schema, validator, output
    conversion, descriptor) is computed here, once, so a call only validates
    its arguments and runs the function.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        plugin: str,
        name: str,
        title: str,
        description: str,
        annotations: tool_pb2.ToolAnnotations,
        localns: Mapping[str, Any] | None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.is_async = inspect.iscoroutinefunction(fn)
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                f"tool {name!r}: a tool returns its result; use ctx.report_progress "
                "for progress, or @app.agent for a stream of events"
            )
        self.arguments: Arguments = read_signature(
            fn, title=f"{name}_arguments", context_types=(ToolContext,), localns=localns
        )
        returns = type_hints(fn, localns).get("return", inspect.Signature.empty)
        self.converter = ResultConverter(returns)
        self.logger = logging.getLogger(f"{plugin}.{name}")
        self.descriptor = tool_pb2.ToolDescriptor(
            name=name,
            title=title,
            description=description,
            input_schema=to_struct(self.arguments.schema()),
            annotations=annotations,
        )
        if self.converter.output_schema:
            self.descriptor.output_schema.CopyFrom(to_struct(self.converter.output_schema))

    @property
    def takes_context(self) -> bool:
        """True when the function has a ``ToolContext`` parameter."""
        return self.arguments.context_param is not None

    def bind(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments for a call; raises ``InvalidArgumentError`` naming bad fields."""
        return self.arguments.bind(arguments, f"arguments for tool {self.name!r}")

    async def run(self, kwargs: dict[str, Any], ctx: ToolContext | None) -> tool_pb2.ToolResult:
        """Runs the tool and converts what it returns; ``ToolError`` becomes an error result."""
        if ctx is not None and self.arguments.context_param is not None:
            kwargs[self.arguments.context_param] = ctx
        try:
            if self.is_async:
                value = await self.fn(**kwargs)
            else:
                value = await asyncio.to_thread(functools.partial(self.fn, **kwargs))
        except ToolError as failure:
            return failure.to_proto()
        return self.converter.convert(value)
