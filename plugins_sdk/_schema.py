"""JSON Schemas and validators derived from Python signatures, built once per function.

A tool's input schema is the schema of a pydantic model with one field per
parameter; that model is also the validator the tool's arguments go through on
every call, so the schema a client sees and the check a call meets cannot
drift apart.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from sidemesh.core import FieldViolation, InvalidArgumentError

#: How many bad fields an error message spells out (all of them are in the details).
_MAX_LISTED = 5


@dataclass(frozen=True)
class Arguments:
    """The validated call of one function: its parameters as a model, and the injected one."""

    model: type[BaseModel]
    #: ``(parameter name, model field name)`` of each parameter in the schema.
    params: tuple[tuple[str, str], ...]
    #: Name of the parameter that receives the call context, if any.
    context_param: str | None

    def schema(self) -> dict[str, Any]:
        """The JSON Schema (an object schema) the arguments must satisfy."""
        return self.model.model_json_schema(by_alias=True)

    def bind(
        self,
        arguments: Mapping[str, Any],
        what: str,
        prefix: str = "arguments",
        reason: str = "INVALID_TOOL_ARGUMENTS",
    ) -> dict[str, Any]:
        """Validates ``arguments`` and returns the keyword arguments to call the function with.

        Raises :class:`InvalidArgumentError` naming each bad field under ``prefix``.
        """
        try:
            values = self.model.model_validate(arguments).__dict__
        except pydantic.ValidationError as exc:
            raise invalid_argument(exc, what, prefix, reason) from None
        return {name: values[field] for name, field in self.params}


def read_signature(
    fn: Callable[..., Any],
    *,
    title: str,
    context_types: tuple[type, ...],
    localns: Mapping[str, Any] | None = None,
) -> Arguments:
    """Builds the :class:`Arguments` of ``fn``; raises ``TypeError`` for unsupported signatures.

    A parameter annotated with one of ``context_types`` is injected, not part of
    the schema. ``*args``, ``**kwargs`` and positional-only parameters cannot
    be named in a JSON object, so they are refused.
    """
    hints = type_hints(fn, localns)
    fields: dict[str, Any] = {}
    params: list[tuple[str, str]] = []
    context_param: str | None = None
    for index, param in enumerate(inspect.signature(fn).parameters.values()):
        if param.kind is not param.POSITIONAL_OR_KEYWORD and param.kind is not param.KEYWORD_ONLY:
            raise TypeError(
                f"{fn.__qualname__}: parameter {param.name!r} cannot be passed by name; "
                "declare each argument as a plain typed parameter"
            )
        annotation = hints.get(param.name, Any)
        if _is_context(annotation, context_types):
            context_param = param.name
            continue
        field = f"p{index}"
        default = param.default
        info = Field(alias=param.name)
        if isinstance(default, FieldInfo):
            info = FieldInfo.merge_field_infos(default, info)
        elif default is not inspect.Parameter.empty:
            info = FieldInfo.merge_field_infos(info, Field(default=default))
        fields[field] = (annotation, info)
        params.append((param.name, field))
    model = pydantic.create_model(
        title,
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=False),
        **fields,
    )
    return Arguments(model, tuple(params), context_param)


def type_hints(fn: Callable[..., Any], localns: Mapping[str, Any] | None) -> dict[str, Any]:
    """``fn``'s resolved annotations; ``localns`` resolves names local to where it was defined."""
    try:
        return typing.get_type_hints(fn, localns=dict(localns or {}), include_extras=True)
    except NameError as exc:
        raise TypeError(f"{fn.__qualname__}: cannot resolve a type annotation: {exc}") from None


def _is_context(annotation: Any, context_types: tuple[type, ...]) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, context_types)


# -- output schemas ----------------------------------------------------------


def output_schema(annotation: Any, unstructured: tuple[type, ...]) -> tuple[dict[str, Any], bool]:
    """The output schema for a return annotation, and whether values are wrapped as ``result``.

    Returns ``({}, False)`` when the annotation says nothing structured
    (missing, ``Any``, ``None``, or any of the ``unstructured`` types).
    """
    if _unstructured(annotation, unstructured):
        return {}, False
    schema = pydantic.TypeAdapter(annotation).json_schema(mode="serialization")
    if schema.get("type") == "object":
        return schema, False
    defs = schema.pop("$defs", None)
    wrapped: dict[str, Any] = {
        "type": "object",
        "properties": {"result": schema},
        "required": ["result"],
    }
    if defs:
        wrapped["$defs"] = defs
    return wrapped, True


def _unstructured(annotation: Any, unstructured: tuple[type, ...]) -> bool:
    if annotation in (inspect.Signature.empty, Any, None, type(None)):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unstructured(typing.get_args(annotation)[0], unstructured)
    if origin in (typing.Union, types.UnionType):
        return any(_unstructured(arg, unstructured) for arg in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, unstructured)


# -- validation errors -------------------------------------------------------


def invalid_argument(
    exc: pydantic.ValidationError, what: str, prefix: str, reason: str
) -> InvalidArgumentError:
    """An ``INVALID_ARGUMENT`` error naming each bad field of ``exc`` by its JSON path."""
    violations = [
        FieldViolation(json_path(prefix, error["loc"]), _describe(error))
        for error in exc.errors(include_url=False)
    ]
    listed = "; ".join(
        f"{v.field.removeprefix(prefix).lstrip('.') or prefix}: {v.description}"
        for v in violations[:_MAX_LISTED]
    )
    more = len(violations) - _MAX_LISTED
    if more > 0:
        listed += f"; and {more} more"
    return InvalidArgumentError(
        f"invalid {what}: {listed}",
        reason=reason,
        field_violations=violations,
    )


def json_path(prefix: str, loc: Sequence[int | str]) -> str:
    """``prefix`` followed by ``loc`` as a JSON path: ``arguments.items[2].name``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _describe(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required, but missing"
    if kind == "extra_forbidden":
        return "unexpected field"
    message = str(error["msg"])
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    if "input" in error:
        given = repr(error["input"])
        if len(given) <= 40:
            message += f" (got {given})"
    return message
