"""Blocking views of the async streams and chat session, run on a ``LoopThread``."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

from google.protobuf.message import Message

from clients._chat import ChatSession
from clients._loop import LoopThread
from clients._results import AgentReply, ToolCallResult
from clients._streams import AgentStream, ServerStream, ToolCallStream
from sidemesh.core import FailedPreconditionError
from sidemesh.v1 import agent_pb2, tool_pb2

ResponseT = TypeVar("ResponseT", bound=Message)


class SyncStream(Iterator[ResponseT]):
    """The responses of one server-streaming call, read by blocking.

    A ``for`` loop reads it; leaving the loop early (``break``, an exception)
    cancels the call so the server stops working on it. ``next(stream)`` reads
    one response without that guard.
    """

    def __init__(self, stream: ServerStream[ResponseT], loop: LoopThread) -> None:
        self._stream = stream
        self._loop = loop

    @property
    def description(self) -> str:
        """What the call is, for messages: ``agent 'assistant'``, ``tool 'add'``."""
        return self._stream.description

    def done(self) -> bool:
        """True once the call has ended, however it ended."""
        return self._stream.done()

    def cancel(self) -> bool:
        """Cancels the call; the server sees ``CANCELLED``. False if it had ended already."""
        return _cancel(self._loop, self._stream.cancel)

    def close(self) -> None:
        """Cancels the call unless it has ended."""
        self.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.cancel()

    def __iter__(self) -> Iterator[ResponseT]:
        return self._guarded()

    def _guarded(self) -> Generator[ResponseT, None, None]:
        try:
            while True:
                try:
                    response = next(self)
                except StopIteration:
                    return
                yield response
        finally:
            self.cancel()

    def __next__(self) -> ResponseT:
        return self._loop.next(self._stream)


class SyncAgentStream(SyncStream[agent_pb2.InvokeResponse]):
    """The events of one agent turn, read by blocking; the last one is its ``result``."""

    def __init__(self, stream: AgentStream, loop: LoopThread) -> None:
        super().__init__(stream, loop)
        self._agent_stream = stream

    def collect(self) -> AgentReply:
        """Reads the stream to its end and folds every event into an ``AgentReply``."""
        return self._loop.run(self._agent_stream.collect())


class SyncToolCallStream(SyncStream[tool_pb2.CallToolResponse]):
    """The events of one tool call, read by blocking: progress, logs, then the ``result``."""

    def __init__(self, stream: ToolCallStream, loop: LoopThread) -> None:
        super().__init__(stream, loop)
        self._tool_stream = stream

    @property
    def result(self) -> ToolCallResult | None:
        """The tool's result once the stream has delivered it, else ``None``."""
        return self._tool_stream.result

    def collect(self) -> ToolCallResult:
        """Reads the stream to its end and returns the tool's result."""
        return self._loop.run(self._tool_stream.collect())


class SyncChatSession(Iterator[agent_pb2.ChatResponse]):
    """A conversation with one agent, by blocking calls; see ``ChatSession``.

    Iterating reads the agent's events; leaving a ``for`` loop does not end
    the conversation. As a context manager, a clean exit half-closes it and
    waits for the agent to end it; other exits cancel it.
    """

    def __init__(self, session: ChatSession, loop: LoopThread) -> None:
        self._session = session
        self._loop = loop

    @property
    def description(self) -> str:
        """What the conversation is with, for messages: ``agent 'assistant'``."""
        return self._session.description

    @property
    def turn_running(self) -> bool:
        """True from a turn's first ``send`` until its ``result`` has been read."""
        return self._session.turn_running

    def done(self) -> bool:
        """True once the call has ended, however it ended."""
        return self._session.done()

    def send(self, input: str | Mapping[str, Any] | agent_pb2.AgentInput) -> None:
        """Sends input: starts a turn, or adds to the running one."""
        self._loop.run(self._session.send(input))

    def end_turn(self) -> None:
        """Tells the agent that the running turn has all its input."""
        self._loop.run(self._session.end_turn())

    def cancel_turn(self) -> None:
        """Asks the agent to stop the running turn; it ends with a ``CANCELLED`` result."""
        self._loop.run(self._session.cancel_turn())

    def close(self) -> None:
        """Half-closes the conversation: the agent ends it after the running turn."""
        self._loop.run(self._session.close())

    def cancel(self) -> bool:
        """Cancels the whole conversation; the agent sees ``CANCELLED``."""
        return _cancel(self._loop, self._session.cancel)

    def turn(self, input: str | Mapping[str, Any] | agent_pb2.AgentInput) -> AgentReply:
        """Runs one turn: sends ``input`` and ``end_turn``, reads events up to its result."""
        return self._loop.run(self._session.turn(input))

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> agent_pb2.ChatResponse:
        return self._loop.next(self._session)

    def __enter__(self) -> Self:
        self._loop.run(self._session.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop.stopped:
            return
        self._loop.run(self._session.__aexit__(exc_type, exc, tb))


def _cancel(loop: LoopThread, cancel: Callable[[], bool]) -> bool:
    """Runs a call's ``cancel`` on its loop; a closed client has cancelled every call already."""
    try:
        return loop.call(cancel)
    except FailedPreconditionError:
        return False
