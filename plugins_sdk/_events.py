"""What agents take and yield: ``AgentInput``, and ``Progress``, ``Log`` and ``Result`` events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sidemesh.core import struct_to_dict, to_struct
from sidemesh.v1 import agent_pb2, common_pb2

#: Log levels as MCP and ``sidemesh.v1.LogLevel`` name them.
LogLevelName = Literal[
    "debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"
]

_LEVELS: dict[str, tuple[common_pb2.LogLevel.ValueType, int]] = {
    "debug": (common_pb2.LOG_LEVEL_DEBUG, logging.DEBUG),
    "info": (common_pb2.LOG_LEVEL_INFO, logging.INFO),
    "notice": (common_pb2.LOG_LEVEL_NOTICE, logging.INFO),
    "warning": (common_pb2.LOG_LEVEL_WARNING, logging.WARNING),
    "error": (common_pb2.LOG_LEVEL_ERROR, logging.ERROR),
    "critical": (common_pb2.LOG_LEVEL_CRITICAL, logging.CRITICAL),
    "alert": (common_pb2.LOG_LEVEL_ALERT, logging.CRITICAL),
    "emergency": (common_pb2.LOG_LEVEL_EMERGENCY, logging.CRITICAL),
}


def log_levels(level: str) -> tuple[common_pb2.LogLevel.ValueType, int]:
    """The wire level and the ``logging`` level for a level name; ``ValueError`` if unknown."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}") from None


@dataclass(frozen=True)
class AgentInput:
    """The input of one agent turn: text, structured data, or both, and attachments."""

    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    attachments: tuple[common_pb2.Content, ...] = ()

    @classmethod
    def from_proto(cls, message: agent_pb2.AgentInput) -> AgentInput:
        """The SDK's view of a ``sidemesh.v1.AgentInput``."""
        return cls(
            text=message.text,
            data=struct_to_dict(message.data) if message.HasField("data") else {},
            attachments=tuple(message.attachments),
        )


@dataclass(frozen=True)
class Progress:
    """Yielded by an agent to report how far it has got."""

    progress: float
    total: float | None = None
    message: str = ""

    def to_proto(self) -> common_pb2.Progress:
        """The ``sidemesh.v1.Progress`` message."""
        return common_pb2.Progress(progress=self.progress, total=self.total, message=self.message)


@dataclass(frozen=True)
class Log:
    """Yielded by an agent to send a log line to its caller (and to the plugin's log)."""

    message: str
    level: LogLevelName = "info"
    data: Mapping[str, Any] | None = None

    def to_proto(self, logger: str) -> common_pb2.LogRecord:
        """The ``sidemesh.v1.LogRecord`` message, attributed to ``logger``."""
        record = common_pb2.LogRecord(
            level=log_levels(self.level)[0], message=self.message, logger=logger
        )
        if self.data is not None:
            record.data.CopyFrom(to_struct(self.data))
        return record


_STATUSES = {
    "completed": agent_pb2.AGENT_RESULT_STATUS_COMPLETED,
    "failed": agent_pb2.AGENT_RESULT_STATUS_FAILED,
    "cancelled": agent_pb2.AGENT_RESULT_STATUS_CANCELLED,
}


@dataclass(frozen=True)
class Result:
    """Yielded by an agent to end its turn; a ``completed`` one is sent if it yields none.

    ``usage`` takes ``input_tokens``, ``output_tokens`` and ``tool_calls``; tool
    calls made with ``ctx.call_tool`` are counted when it leaves them out.
    """

    status: Literal["completed", "failed"] = "completed"
    message: str = ""
    usage: Mapping[str, int] | None = None
    metadata: Mapping[str, Any] | None = None

    def to_proto(self, tool_calls: int = 0) -> agent_pb2.AgentResult:
        """The ``sidemesh.v1.AgentResult`` message; ``tool_calls`` is the default count."""
        usage = dict(self.usage or {})
        usage.setdefault("tool_calls", tool_calls)
        result = agent_pb2.AgentResult(
            status=_STATUSES[self.status],
            message=self.message,
            usage=agent_pb2.Usage(**usage),
        )
        if self.metadata is not None:
            result.metadata.CopyFrom(to_struct(self.metadata))
        return result


def cancelled_result(message: str, tool_calls: int = 0) -> agent_pb2.AgentResult:
    """The result of a turn the client cancelled."""
    return agent_pb2.AgentResult(
        status=agent_pb2.AGENT_RESULT_STATUS_CANCELLED,
        message=message,
        usage=agent_pb2.Usage(tool_calls=tool_calls),
    )
