"""A registered agent: its descriptor, input parsing and event conversion, built once."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pydantic

from plugins_sdk._context import AgentContext, Emit, Event
from plugins_sdk._events import AgentInput, Log, Progress, Result, log_levels
from plugins_sdk._schema import invalid_argument, type_hints
from sidemesh.core import dict_to_struct, jsonable, to_struct
from sidemesh.v1 import agent_pb2

_YIELDABLE = "a str, a dict, a pydantic model, Progress, Log or Result"


class AgentSpec:
    """One agent of a plugin, ready to run turns."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        plugin: str,
        name: str,
        description: str,
        version: str,
        capabilities: Sequence[str],
        input_model: type[pydantic.BaseModel] | None,
        output_model: type[pydantic.BaseModel] | None,
        localns: Mapping[str, Any] | None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.is_generator = inspect.isasyncgenfunction(fn)
        if not self.is_generator and not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"agent {name!r} must be an async generator (async def ... yield) "
                "or an async function"
            )
        params = list(inspect.signature(fn).parameters.values())
        if not 1 <= len(params) <= 2:
            raise TypeError(f"agent {name!r} takes (input) or (input, ctx), not {len(params)}")
        self.takes_context = len(params) == 2
        if input_model is None:
            first = type_hints(fn, localns).get(params[0].name)
            if isinstance(first, type) and issubclass(first, pydantic.BaseModel):
                input_model = first
        self._input = pydantic.TypeAdapter(input_model) if input_model else None
        self._output = pydantic.TypeAdapter(output_model) if output_model else None
        self.logger = logging.getLogger(f"{plugin}.{name}")
        self.descriptor = agent_pb2.AgentDescriptor(
            name=name, description=description, version=version, capabilities=capabilities
        )
        if input_model is not None:
            self.descriptor.input_schema.CopyFrom(to_struct(input_model.model_json_schema()))
        if output_model is not None:
            self.descriptor.output_schema.CopyFrom(to_struct(output_model.model_json_schema()))

    def parse_input(self, message: agent_pb2.AgentInput) -> tuple[AgentInput, Any]:
        """The turn's input, and what the function receives (``AgentInput`` or the model).

        Raises ``InvalidArgumentError`` naming the bad fields of ``input.data``.
        """
        given = AgentInput.from_proto(message)
        if self._input is None:
            return given, given
        try:
            return given, self._input.validate_python(given.data)
        except pydantic.ValidationError as exc:
            raise invalid_argument(
                exc, f"input for agent {self.name!r}", "input.data", "INVALID_AGENT_INPUT"
            ) from None

    async def run(self, arg: Any, ctx: AgentContext, emit: Emit) -> agent_pb2.AgentResult:
        """Runs one turn, emitting its events; returns the turn's result."""
        args = (arg, ctx) if self.takes_context else (arg,)
        if not self.is_generator:
            value = await self.fn(*args)
            if isinstance(value, Result):
                return value.to_proto(ctx.tool_calls)
            if value is not None:
                await emit(self._event(value))
            return Result().to_proto(ctx.tool_calls)
        events: AsyncIterator[Any] = self.fn(*args)
        try:
            async for item in events:
                if isinstance(item, Result):
                    return item.to_proto(ctx.tool_calls)
                await emit(self._event(item))
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return Result().to_proto(ctx.tool_calls)

    def _event(self, item: object) -> Event:
        if isinstance(item, str):
            return ("text_delta", agent_pb2.TextDelta(text=item))
        if isinstance(item, Progress):
            return ("progress", item.to_proto())
        if isinstance(item, Log):
            self.logger.log(log_levels(item.level)[1], "%s", item.message)
            return ("log", item.to_proto(self.logger.name))
        if isinstance(item, dict | pydantic.BaseModel):
            if self._output is not None:
                plain = self._output.dump_python(self._output.validate_python(item), mode="json")
            else:
                plain = jsonable(item)
            return ("output", agent_pb2.StructuredOutput(data=dict_to_struct(plain)))
        raise TypeError(f"agent {self.name!r} yielded a {type(item).__name__}; yield {_YIELDABLE}")
