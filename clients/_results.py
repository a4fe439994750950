"""What a finished call gives back: a tool's result, an agent's reply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sidemesh.core import struct_to_dict
from sidemesh.v1 import agent_pb2, common_pb2, tool_pb2


@dataclass(frozen=True)
class ToolCallResult:
    """The outcome of a tool call, in Python terms, with the proto kept in ``raw``.

    ``is_error`` means the tool failed at its task and ``content`` says why: a
    result the caller (or a model) reads, not an exception.
    """

    content: list[common_pb2.Content]
    structured: dict[str, Any] | None
    is_error: bool
    raw: tool_pb2.ToolResult

    @property
    def text(self) -> str:
        """The text parts of ``content``, joined with newlines."""
        return "\n".join(part.text for part in self.content if part.WhichOneof("kind") == "text")

    @classmethod
    def from_proto(cls, result: tool_pb2.ToolResult) -> ToolCallResult:
        """Reads a ``ToolResult``; ``structured`` is ``None`` when the tool sent none."""
        structured = (
            struct_to_dict(result.structured_content)
            if result.HasField("structured_content")
            else None
        )
        return cls(
            content=list(result.content),
            structured=structured,
            is_error=result.is_error,
            raw=result,
        )


@dataclass(frozen=True)
class AgentReply:
    """An agent turn read to its end: the text, the result, and every event."""

    #: All text deltas, joined in order.
    text: str
    #: The turn's final ``result`` event.
    result: agent_pb2.AgentResult
    #: The data of every structured ``output`` event, in order.
    outputs: list[dict[str, Any]]
    #: Every event of the turn, the ``result`` last (``ChatResponse`` for a chat turn).
    events: list[agent_pb2.InvokeResponse | agent_pb2.ChatResponse]

    @property
    def failed(self) -> bool:
        """True when the agent ended the turn as failed (its reason is ``result.message``)."""
        return self.result.status == agent_pb2.AGENT_RESULT_STATUS_FAILED

    @property
    def cancelled(self) -> bool:
        """True when the turn was cancelled (``ChatSession.cancel_turn``)."""
        return self.result.status == agent_pb2.AGENT_RESULT_STATUS_CANCELLED


def reply_from_events(
    events: Iterable[agent_pb2.InvokeResponse | agent_pb2.ChatResponse],
) -> AgentReply:
    """Folds a turn's events, the last one its ``result``, into an ``AgentReply``."""
    kept = list(events)
    if not kept or kept[-1].WhichOneof("event") != "result":
        raise ValueError("a turn's events must end with its result")
    text: list[str] = []
    outputs: list[dict[str, Any]] = []
    for event in kept:
        kind = event.WhichOneof("event")
        if kind == "text_delta":
            text.append(event.text_delta.text)
        elif kind == "output":
            outputs.append(struct_to_dict(event.output.data))
    return AgentReply(text="".join(text), result=kept[-1].result, outputs=outputs, events=kept)
