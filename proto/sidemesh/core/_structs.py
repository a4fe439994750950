"""Conversions between Python values and ``google.protobuf.Struct``, the contracts' JSON objects.

One pair for every side: clients send arguments with :func:`to_struct`, plugins
return results with it, the router and the SDK read arguments back with
:func:`struct_to_dict`. A ``Struct``'s numbers are doubles; reading them back,
whole numbers become ``int`` again (``{"sum": 5}``, not ``5.0``), as a JSON
parser in any other language would show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic_core
from google.protobuf import struct_pb2

#: Largest integer a double holds exactly; larger whole numbers stay floats.
_MAX_SAFE_INT = 2**53


def jsonable(value: object) -> Any:
    """``value`` as plain JSON data (dicts, lists, str, numbers, bool, None).

    Handles pydantic models, dataclasses, datetimes, enums, tuples and sets, so
    what a plugin returns needs no hand conversion. Raises ``ValueError`` for a
    value JSON cannot hold.
    """
    return pydantic_core.to_jsonable_python(value)


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A ``Struct`` holding ``data``, which must already be plain JSON data."""
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def to_struct(data: object) -> struct_pb2.Struct:
    """A ``Struct`` holding ``data``: a mapping with string keys, a pydantic model, a
    dataclass; ``None`` gives an empty one.

    Values are converted with :func:`jsonable` first (models, datetimes, enums,
    sets...). Raises ``ValueError`` for a key that is not a string or a value
    JSON cannot hold, ``TypeError`` when ``data`` is no JSON object at all.
    """
    if data is None:
        return struct_pb2.Struct()
    _check_keys(data)
    try:
        plain = jsonable(data)
    except ValueError as error:
        raise ValueError(f"not a JSON object: {error}") from None
    if not isinstance(plain, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    return dict_to_struct(plain)


def _check_keys(value: object) -> None:
    # pydantic would turn keys into strings (1 -> "1"); a JSON object's keys are strings.
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"not a JSON object (keys must be strings): {key!r}")
            _check_keys(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_keys(item)


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The JSON object a ``Struct`` holds, with whole numbers as ``int``.

    Walks the message directly (no JSON round trip): the router and the SDK
    call this on every tool call.
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
