"""``ChatSession``: one multi-turn conversation over ``AgentService.Chat``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import grpc

from clients._agent_input import agent_input
from clients._results import AgentReply, reply_from_events
from clients._streams import task_is_cancelling
from sidemesh.core import (
    CallCancelledError,
    FailedPreconditionError,
    InternalError,
    SidemeshError,
    from_status,
)
from sidemesh.v1 import agent_pb2

ChatCall = grpc.aio.StreamStreamCall[agent_pb2.ChatRequest, agent_pb2.ChatResponse]


class ChatSession:
    """A conversation with one agent: send input, read events, turn after turn.

    The first message on the wire is ``ChatRequest.start``, sent on first use.
    ``send`` starts a turn (or adds input to the running one), ``end_turn``
    ends its input, and the agent's events, each turn ending with one
    ``result``, are read with ``async for`` (leaving that loop does not end the
    conversation). ``turn`` does all three for the common case.

    As an async context manager, a clean exit half-closes the conversation and
    waits for the agent to end it; an exit with an exception, or with a turn
    whose result was not read, cancels the call. So does cancelling a task
    while it waits for the agent's next event: gRPC cancels the whole call.
    """

    def __init__(self, call: ChatCall, start: agent_pb2.ChatStart, description: str) -> None:
        self._call = call
        self._start_message = start
        self._description = description
        self._lock = asyncio.Lock()
        self._started = False
        self._half_closed = False
        self._turn_running = False
        self._ended = False
        self._error: SidemeshError | None = None

    @property
    def description(self) -> str:
        """What the conversation is with, for messages: ``agent 'assistant'``."""
        return self._description

    @property
    def turn_running(self) -> bool:
        """True from a turn's first ``send`` until its ``result`` has been read."""
        return self._turn_running

    def done(self) -> bool:
        """True once the call has ended, however it ended."""
        return self._call.done()

    # -- sending --------------------------------------------------------------

    async def send(self, input: str | Mapping[str, Any] | agent_pb2.AgentInput) -> None:
        """Sends input: starts a turn, or adds to the running one."""
        await self._write(agent_pb2.ChatRequest(input=agent_input(input)))
        self._turn_running = True

    async def end_turn(self) -> None:
        """Tells the agent that the running turn has all its input."""
        await self._write(agent_pb2.ChatRequest(end_turn=agent_pb2.EndTurn()))

    async def cancel_turn(self) -> None:
        """Asks the agent to stop the running turn; it ends with a ``CANCELLED`` result."""
        await self._write(agent_pb2.ChatRequest(cancel_turn=agent_pb2.CancelTurn()))

    async def close(self) -> None:
        """Half-closes the conversation: the agent ends it after the running turn."""
        async with self._lock:
            await self._start_locked()
            if self._half_closed:
                return
            self._half_closed = True
            try:
                await self._call.done_writing()
            except grpc.RpcError as error:
                raise SidemeshError.from_rpc_error(error) from None

    def cancel(self) -> bool:
        """Cancels the whole conversation; the agent sees ``CANCELLED``."""
        return self._call.cancel()

    async def turn(self, input: str | Mapping[str, Any] | agent_pb2.AgentInput) -> AgentReply:
        """Runs one turn: sends ``input`` and ``end_turn``, reads events up to its result."""
        if self._turn_running:
            raise FailedPreconditionError(
                f"a turn with {self._description} is running: read its events up to its "
                "result before starting another with turn()"
            )
        await self.send(input)
        await self.end_turn()
        events: list[agent_pb2.ChatResponse] = []
        async for event in self:
            events.append(event)
            if event.WhichOneof("event") == "result":
                return reply_from_events(events)
        raise InternalError(  # pragma: no cover - __anext__ raises first
            f"the conversation with {self._description} ended without the turn's result"
        )

    # -- receiving ------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> agent_pb2.ChatResponse:
        if self._error is not None:
            raise self._error
        if self._ended:
            raise StopAsyncIteration
        await self._start()
        try:
            response = await self._call.read()
        except grpc.RpcError as error:
            raise self._fail(SidemeshError.from_rpc_error(error)) from None
        except asyncio.CancelledError:
            if task_is_cancelling():
                raise
            raise self._fail(self._cancelled_error()) from None
        if response is grpc.aio.EOF:
            self._ended = True
            if self._turn_running:
                raise self._fail(
                    InternalError(
                        f"the conversation with {self._description} ended without a result "
                        "event for its running turn"
                    )
                )
            raise StopAsyncIteration
        assert isinstance(response, agent_pb2.ChatResponse)
        if response.WhichOneof("event") == "result":
            self._turn_running = False
        return response

    # -- context manager ------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None or self._turn_running or self._error is not None:
            self.cancel()
            return
        if self._ended:
            return
        try:
            await self.close()
            async for _ in self:
                pass  # no turn runs: the agent only has to end the call
        except BaseException:
            self.cancel()
            raise

    # -- internals ------------------------------------------------------------

    def _fail(self, error: SidemeshError) -> SidemeshError:
        self._error = error
        return error

    async def _ended_error(self) -> SidemeshError:
        """Why nothing more can be sent: the call's failure, or that it has ended."""
        if self._call.done() and not self._call.cancelled():
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                details = await self._call.details()
                return from_status(code, details or code.name, await self._call.trailing_metadata())
        if self._call.cancelled():
            return self._cancelled_error()
        return FailedPreconditionError(f"the conversation with {self._description} has ended")

    def _cancelled_error(self) -> CallCancelledError:
        return CallCancelledError(f"the conversation with {self._description} was cancelled")

    async def _start(self) -> None:
        if not self._started:
            async with self._lock:
                await self._start_locked()

    async def _start_locked(self) -> None:
        if not self._started:
            self._started = True
            await self._write_locked(agent_pb2.ChatRequest(start=self._start_message))

    async def _write(self, request: agent_pb2.ChatRequest) -> None:
        async with self._lock:
            await self._start_locked()
            await self._write_locked(request)

    async def _write_locked(self, request: agent_pb2.ChatRequest) -> None:
        if self._half_closed:
            raise FailedPreconditionError(
                f"the conversation with {self._description} is closed for sending"
            )
        try:
            await self._call.write(request)
        except grpc.RpcError as error:
            raise SidemeshError.from_rpc_error(error) from None
        except asyncio.InvalidStateError:
            raise await self._ended_error() from None
        except asyncio.CancelledError:
            if task_is_cancelling():
                raise
            raise self._cancelled_error() from None
