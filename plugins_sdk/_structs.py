"""Conversions between Python values and ``google.protobuf`` JSON types (Struct, Value)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic_core
from google.protobuf import struct_pb2

#: Largest integer a double holds exactly; larger whole numbers stay floats.
_MAX_SAFE_INT = 2**53


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, with whole numbers as ``int`` (``{"n": 3}``, not ``3.0``).

    A Struct's numbers are doubles; restoring whole numbers shows the data as a
    JSON parser in any language would, so ``dict`` and ``Any`` parameters see
    what the caller sent.
    """
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    return None


def jsonable(value: object) -> Any:
    """``value`` as plain JSON data (dicts, lists, str, numbers, bool, None).

    Handles pydantic models, dataclasses, datetimes, enums, tuples and sets, so
    what a plugin returns needs no hand conversion.
    """
    return pydantic_core.to_jsonable_python(value)


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct holding ``data``, which must already be plain JSON data."""
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def to_struct(data: object) -> struct_pb2.Struct:
    """A Struct holding any mapping-like value (converted with :func:`jsonable` first)."""
    plain = jsonable(data)
    if not isinstance(plain, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    return dict_to_struct(plain)
