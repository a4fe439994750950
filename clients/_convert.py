"""Conversions between Python values and the contracts' ``Struct`` / ``AgentInput``.

JSON objects travel as ``google.protobuf.Struct``, whose numbers are doubles.
Reading them back, whole numbers become ``int`` again (``{"sum": 5}``, not
``5.0``), as a JSON parser in any other language would show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from sidemesh.v1 import agent_pb2

#: Largest integer a double holds exactly; larger whole numbers stay floats.
_MAX_SAFE_INT = 2**53


def to_struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A ``Struct`` holding ``data``; raises ``ValueError`` for values JSON cannot hold."""
    struct = struct_pb2.Struct()
    if data:
        try:
            json_format.ParseDict(dict(data), struct)
        except json_format.ParseError as error:
            raise ValueError(f"not a JSON object: {error}") from None
        except TypeError as error:  # a key that is not a string
            raise ValueError(f"not a JSON object (keys must be strings): {error}") from None
    return struct


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


def agent_input(value: str | Mapping[str, Any] | agent_pb2.AgentInput) -> agent_pb2.AgentInput:
    """The ``AgentInput`` for a text (``text``), a mapping (``data``) or an ``AgentInput``."""
    if isinstance(value, agent_pb2.AgentInput):
        return value
    if isinstance(value, str):
        return agent_pb2.AgentInput(text=value)
    return agent_pb2.AgentInput(data=to_struct(value))
