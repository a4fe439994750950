"""Conversions between Python values and ``google.protobuf`` JSON types (Struct, Value)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic_core
from google.protobuf import struct_pb2

# Whole numbers come back as ``int`` (a Struct's numbers are doubles), so ``dict``
# and ``Any`` parameters see what the caller sent.
from clients import struct_to_dict

__all__ = ["dict_to_struct", "jsonable", "struct_to_dict", "to_struct"]


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
