"""What plugin code gets about the call it handles: ``ToolContext`` and ``AgentContext``."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from clients import AsyncMeshClient, ToolCallResult
from plugins_sdk._events import AgentInput, log_levels
from sidemesh.core import SidemeshError, to_struct
from sidemesh.v1 import agent_pb2, common_pb2

if TYPE_CHECKING:
    from plugins_sdk._runtime import AppRuntime

#: One event of a response stream: the name of the ``oneof`` field it sets, and its message.
Event = tuple[str, Message]
Emit = Callable[[Event], Awaitable[None]]
M = TypeVar("M", bound=Message)

CALL_ID_KEY = "sidemesh-call-id"
CALLER_KEY = "sidemesh-caller"
#: ``time_remaining()`` above this means the call has no deadline.
_NO_DEADLINE = 1e8


@dataclass(slots=True)
class CallInfo:
    """Facts about one incoming call, read once from its gRPC context."""

    call_id: str
    caller: str = ""
    #: ``time.monotonic()`` value at which the call's deadline passes; ``None``: no deadline.
    deadline: float | None = None
    #: The call's text metadata, last value per key: where its trace context is read.
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_grpc(cls, context: grpc.aio.ServicerContext[Any, Any]) -> CallInfo:
        """Reads the call id, the caller, the deadline and the metadata of a call."""
        metadata = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        remaining = context.time_remaining()
        deadline = (
            time.monotonic() + remaining
            if remaining is not None and remaining < _NO_DEADLINE
            else None
        )
        return cls(
            metadata.get(CALL_ID_KEY) or new_call_id(),
            metadata.get(CALLER_KEY, ""),
            deadline,
            metadata,
        )


def response(cls: type[M], event: Event) -> M:
    """A response message of type ``cls`` (``InvokeResponse``, ...) carrying ``event``."""
    message = cls()
    getattr(message, event[0]).CopyFrom(event[1])
    return message


def new_call_id() -> str:
    """A call id for a call that arrived without one (a client calling the sidecar directly)."""
    return os.urandom(8).hex()


class TurnInput(Protocol):
    """Where an agent turn reads input that arrives while it runs (``Chat`` only)."""

    async def next(self) -> AgentInput | None:
        """The next input of the turn, or ``None`` once the client ended the turn's input."""
        ...


class CallContext:
    """What every handler can learn about and do within its call.

    Add a parameter annotated ``ToolContext`` (or ``AgentContext``) to a
    handler to receive it.
    """

    def __init__(
        self,
        runtime: AppRuntime,
        name: str,
        info: CallInfo,
        logger: logging.Logger,
        emit: Emit,
    ) -> None:
        self._runtime = runtime
        self._info = info
        self._emit = emit
        self._mesh: AsyncMeshClient | None = None
        #: Set when the call is cancelled (by the client, its deadline or ``cancel_turn``).
        self._cancelled = False
        #: The tool's or agent's name within its plugin.
        self.name = name
        #: A logger named ``plugin.name``: lines go to the plugin's log (stderr), not the caller.
        self.logger = logger

    @property
    def plugin(self) -> str:
        """The plugin's name."""
        return self._runtime.app.name

    @property
    def call_id(self) -> str:
        """The mesh's id of the call (metadata ``sidemesh-call-id``), the same in its logs."""
        return self._info.call_id

    @property
    def caller(self) -> str:
        """The calling plugin's name for a callback (``sidemesh-caller``); ``""`` for a client."""
        return self._info.caller

    @property
    def deadline(self) -> float | None:
        """When the call's deadline passes, as a ``time.monotonic()`` value; ``None``: none."""
        return self._info.deadline

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline (never negative); ``None`` when it has none."""
        deadline = self._info.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def cancelled(self) -> bool:
        """True once the call has been cancelled; the handler also sees ``CancelledError``."""
        return self._cancelled

    @property
    def config(self) -> Any:
        """The plugin's validated config: a ``config_model`` instance, else a dict."""
        return self._runtime.config

    @property
    def tracer(self) -> trace.Tracer:
        """An OpenTelemetry tracer named after the plugin; its spans nest under the call's."""
        return self._runtime.tracer

    @property
    def mesh(self) -> AsyncMeshClient:
        """The mesh, for calling other tools and agents: the plugin's ``AsyncMeshClient``.

        Callbacks inherit this call's deadline (``with_deadline``), and join its trace: the call's
        span is current while the handler runs, and the client's tracing
        interceptors make each callback a child of it.
        """
        if self._mesh is None:
            self._mesh = self._runtime.mesh_client().with_deadline(self.time_remaining)
        return self._mesh

    async def report_progress(
        self, progress: float, total: float | None = None, message: str = ""
    ) -> None:
        """Streams a progress event to the caller."""
        await self._emit(
            ("progress", common_pb2.Progress(progress=progress, total=total, message=message))
        )
        await asyncio.sleep(0)  # let the event go out before more work is done

    async def log(
        self, message: str, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None:
        """Streams a log record to the caller, and logs it to the plugin's log too."""
        wire_level, py_level = log_levels(level)
        record = common_pb2.LogRecord(level=wire_level, message=message, logger=self.logger.name)
        if data is not None:
            record.data.CopyFrom(to_struct(data))
        self.logger.log(py_level, "%s", message)
        await self._emit(("log", record))
        await asyncio.sleep(0)


def mark_cancelled(ctx: CallContext) -> None:
    """Makes ``ctx.cancelled`` true; the runtime calls it just before cancelling the handler."""
    ctx._cancelled = True


class ToolContext(CallContext):
    """The context of one tool call."""


class AgentContext(CallContext):
    """The context of one agent turn: its input, session, conversation state and tool calls."""

    def __init__(
        self,
        runtime: AppRuntime,
        name: str,
        info: CallInfo,
        logger: logging.Logger,
        emit: Emit,
        *,
        input: AgentInput,
        session_id: str = "",
        options: dict[str, Any] | None = None,
        turn: int = 1,
        state: dict[str, Any] | None = None,
        more: TurnInput | None = None,
    ) -> None:
        super().__init__(runtime, name, info, logger, emit)
        #: The turn's input as it arrived (also when the agent takes an ``input_model``).
        self.input = input
        #: The conversation or session id the client gave; ``""`` when none.
        self.session_id = session_id
        #: Agent-specific options from the request.
        self.options: dict[str, Any] = options if options is not None else {}
        #: The turn's number within the conversation, from 1 (always 1 for ``Invoke``).
        self.turn = turn
        #: A dict kept for the whole conversation (``Chat``); fresh for each ``Invoke``.
        self.state: dict[str, Any] = state if state is not None else {}
        self._more = more
        self._tool_calls = 0

    @property
    def tool_calls(self) -> int:
        """How many tool calls the turn has made with :meth:`call_tool`."""
        return self._tool_calls

    async def more_input(self) -> AsyncIterator[AgentInput]:
        """Input the client sends while the turn runs, until it ends the turn (``Chat``).

        Ends at once for ``Invoke``. Input the turn does not read starts the next turn.
        """
        if self._more is None:
            return
        while (item := await self._more.next()) is not None:
            yield item

    async def call_tool(
        self, tool: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> ToolCallResult:
        """Calls a tool through the mesh, reporting the call in the turn's event stream.

        The caller sees ``tool_call_started`` then ``tool_call_finished``. A call
        that fails raises its ``SidemeshError`` after ``tool_call_finished``
        reports the status.
        """
        merged = {**(arguments or {}), **kwargs}
        self._tool_calls += 1
        call_id = str(self._tool_calls)
        await self._emit(
            (
                "tool_call_started",
                agent_pb2.ToolCallStarted(call_id=call_id, tool=tool, arguments=to_struct(merged)),
            )
        )
        finished = agent_pb2.ToolCallFinished(call_id=call_id, tool=tool)
        try:
            result = await self.mesh.call_tool(tool, merged)
        except SidemeshError as exc:
            finished.error_code = exc.code.value[0]
            finished.error_message = exc.message
            await self._emit(("tool_call_finished", finished))
            raise
        except asyncio.CancelledError:
            finished.error_code = grpc.StatusCode.CANCELLED.value[0]
            finished.error_message = "the agent's turn was cancelled"
            await self._emit(("tool_call_finished", finished))
            raise
        finished.result.CopyFrom(result.raw)
        await self._emit(("tool_call_finished", finished))
        return result
