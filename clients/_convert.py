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
    """The JSON object a ``Struct`` holds, with whole numbers as ``int``."""
    data: dict[str, Any] = _restore_ints(json_format.MessageToDict(struct))
    return data


def agent_input(value: str | Mapping[str, Any] | agent_pb2.AgentInput) -> agent_pb2.AgentInput:
    """The ``AgentInput`` for a text (``text``), a mapping (``data``) or an ``AgentInput``."""
    if isinstance(value, agent_pb2.AgentInput):
        return value
    if isinstance(value, str):
        return agent_pb2.AgentInput(text=value)
    return agent_pb2.AgentInput(data=to_struct(value))


def _restore_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_SAFE_INT:
        return int(value)
    if isinstance(value, dict):
        return {key: _restore_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore_ints(item) for item in value]
    return value
