"""``AgentInput`` from what a client passes: a text, a mapping, or the message itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidemesh.core import to_struct
from sidemesh.v1 import agent_pb2


def agent_input(value: str | Mapping[str, Any] | agent_pb2.AgentInput) -> agent_pb2.AgentInput:
    """The ``AgentInput`` for a text (``text``), a mapping (``data``) or an ``AgentInput``."""
    if isinstance(value, agent_pb2.AgentInput):
        return value
    if isinstance(value, str):
        return agent_pb2.AgentInput(text=value)
    return agent_pb2.AgentInput(data=to_struct(value))
