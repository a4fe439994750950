"""Server-streaming calls as cancellable async iterators that raise ``SidemeshError``.

A stream either completes or raises: gRPC failures become ``SidemeshError``
subclasses, a locally cancelled call becomes ``CallCancelledError``, and a
stream whose contract promises a final ``result`` event but ends ``OK``
without one raises ``InternalError`` instead of handing back truncated data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Self, TypeVar, cast

import grpc
from google.protobuf.message import Message

from clients._results import AgentReply, ToolCallResult, reply_from_events
from sidemesh.core import CallCancelledError, InternalError, SidemeshError
from sidemesh.v1 import agent_pb2, tool_pb2

ResponseT = TypeVar("ResponseT", bound=Message)
T = TypeVar("T")


def task_is_cancelling() -> bool:
    """True when the running task itself is being cancelled (not just its gRPC call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def unary(call: grpc.aio.UnaryUnaryCall[Any, T], description: str) -> T:
    """Awaits a unary call, turning its failure into a ``SidemeshError``."""
    try:
        return await call
    except grpc.RpcError as error:
        raise SidemeshError.from_rpc_error(error) from None
    except asyncio.CancelledError:
        if task_is_cancelling():
            raise
        raise CallCancelledError(f"{description} was cancelled by the client") from None


class ServerStream(AsyncIterator[ResponseT]):
    """The responses of one server-streaming call, in order.

    ``async for`` or ``await anext(stream)`` read it; a stream is read once,
    in any mix of the two. A stream dropped before its end (leaving ``async
    for`` early over ``client.invoke(...)``, an exception, the task being
    cancelled) cancels its call, so the server stops working on it. Keep a
    reference and the call goes on: end it with ``cancel()`` or ``async with``.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, ResponseT], description: str) -> None:
        self._call = call
        self._description = description
        self._ended = False
        self._error: SidemeshError | None = None

    @property
    def description(self) -> str:
        """What the call is, for messages: ``agent 'assistant'``, ``tool 'add'``."""
        return self._description

    def done(self) -> bool:
        """True once the call has ended, however it ended."""
        return self._call.done()

    def cancel(self) -> bool:
        """Cancels the call; the server sees ``CANCELLED``. False if it had ended already."""
        return self._call.cancel()

    async def aclose(self) -> None:
        """Cancels the call unless it has ended; for ``contextlib.aclosing``."""
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cancel()

    def __aiter__(self) -> Self:
        return self

    def __del__(self) -> None:
        # Dropped unfinished: nobody will read the rest, so stop the server's work.
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            with contextlib.suppress(Exception):  # e.g. the loop is already closed
                call.cancel()

    async def __anext__(self) -> ResponseT:
        if self._error is not None:
            raise self._error
        if self._ended:
            raise StopAsyncIteration
        response = await self._read()
        if response is None:
            self._ended = True
            self._at_end()
            raise StopAsyncIteration
        self._record(response)
        if self._is_last(response):
            await self._expect_end()
        return response

    # -- hooks for streams with a contract about their events -----------------

    def _record(self, response: ResponseT) -> None:
        """Called with every response, in order."""

    def _is_last(self, response: ResponseT) -> bool:
        """True when ``response`` must be the stream's last one."""
        return False

    def _at_end(self) -> None:
        """Called when the stream ended ``OK``; raises if that end broke the contract."""

    # -- reading --------------------------------------------------------------

    def _fail(self, error: SidemeshError) -> SidemeshError:
        self._error = error
        return error

    async def _read(self) -> ResponseT | None:
        try:
            response = await self._call.read()
        except grpc.RpcError as error:
            raise self._fail(SidemeshError.from_rpc_error(error)) from None
        except asyncio.CancelledError:
            if task_is_cancelling():
                raise
            raise self._fail(
                CallCancelledError(f"{self._description} was cancelled by the client")
            ) from None
        if response is grpc.aio.EOF:
            return None
        return cast(ResponseT, response)

    async def _expect_end(self) -> None:
        # Wait for the status after the last event, so that a failure after it is
        # reported and a caller who stops reading there does not cancel a finished call.
        extra = await self._read()
        if extra is not None:
            self._call.cancel()
            raise self._fail(InternalError(f"{self._description} sent events after its result"))
        self._ended = True


class _ResultStream(ServerStream[ResponseT]):
    """A stream whose contract ends it with exactly one ``result`` event."""

    def _is_last(self, response: ResponseT) -> bool:
        kind: str | None = response.WhichOneof("event")
        return kind == "result"

    def _at_end(self) -> None:
        raise self._fail(InternalError(f"{self._description} ended without a result event"))


class AgentStream(_ResultStream[agent_pb2.InvokeResponse]):
    """The events of one ``AgentService.Invoke`` call; the last one is its ``result``."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[Any, agent_pb2.InvokeResponse],
        description: str,
    ) -> None:
        super().__init__(call, description)
        self._events: list[agent_pb2.InvokeResponse] = []

    def _record(self, response: agent_pb2.InvokeResponse) -> None:
        self._events.append(response)

    async def collect(self) -> AgentReply:
        """Reads the stream to its end and folds every event into an ``AgentReply``.

        Events already read by iterating are included; an interrupted collect
        cancels the call.
        """
        async for _ in self:
            pass
        return reply_from_events(self._events)


class ToolCallStream(_ResultStream[tool_pb2.CallToolResponse]):
    """The events of one ``ToolService.CallTool`` call: progress, logs, then the ``result``."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[Any, tool_pb2.CallToolResponse],
        description: str,
    ) -> None:
        super().__init__(call, description)
        self._result: ToolCallResult | None = None

    @property
    def result(self) -> ToolCallResult | None:
        """The tool's result once the stream has delivered it, else ``None``."""
        return self._result

    def _record(self, response: tool_pb2.CallToolResponse) -> None:
        if response.WhichOneof("event") == "result":
            self._result = ToolCallResult.from_proto(response.result)

    async def collect(self) -> ToolCallResult:
        """Reads the stream to its end and returns the tool's result."""
        async for _ in self:
            pass
        result = self.result
        if result is None:  # pragma: no cover - the stream raises before this
            raise InternalError(f"{self._description} ended without a result event")
        return result
