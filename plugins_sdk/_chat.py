"""``AgentChat``: one ``AgentService.Chat`` conversation, turn by turn.

The client's messages are read by their own task, so ``cancel_turn`` and more
input reach a turn while it runs. Turns run one at a time, each as a task
whose events go, tagged with the turn number, to the response stream.

Input is kept in one inbox per turn: the first input opens it, input while it
is open (before ``end_turn``) is the turn's ``ctx.more_input()``. Input the
turn did not read when it ends is not dropped: the inbox carries over and its
first unread input starts the next turn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from plugins_sdk._agents import AgentSpec
from plugins_sdk._context import AgentContext, CallInfo, Event, mark_cancelled, response
from plugins_sdk._events import AgentInput, cancelled_result
from plugins_sdk._pump import CANCEL_GRACE, Outbox
from plugins_sdk._runtime import AppRuntime
from plugins_sdk._tracing import CallSpan
from sidemesh.core import InvalidArgumentError, struct_to_dict
from sidemesh.v1 import agent_pb2

_CLOSED: Any = object()


async def first_message(requests: AsyncIterator[agent_pb2.ChatRequest]) -> agent_pb2.ChatStart:
    """The stream's ``start``; ``InvalidArgumentError`` when it does not open with one."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("message") != "start":
        got = "nothing" if first is None else repr(first.WhichOneof("message"))
        raise InvalidArgumentError(
            f"a Chat stream must open with ChatRequest.start, got {got}",
            reason="CHAT_NOT_STARTED",
        )
    return first.start


class _Inbox:
    """A turn's input: what the client sent for it, and whether it ended the turn's input."""

    def __init__(self, first: agent_pb2.AgentInput) -> None:
        self._items: deque[agent_pb2.AgentInput] = deque([first])
        self._changed = asyncio.Event()
        self.closed = False

    def put(self, item: agent_pb2.AgentInput) -> None:
        self._items.append(item)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def take(self) -> agent_pb2.AgentInput | None:
        return self._items.popleft() if self._items else None

    def __bool__(self) -> bool:
        return bool(self._items)

    async def next(self) -> AgentInput | None:
        """For ``ctx.more_input()``: the next input, or ``None`` once the input ended."""
        while not self._items:
            if self.closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        return AgentInput.from_proto(self._items.popleft())


class AgentChat:
    """The state of one conversation; :meth:`run` is its response stream."""

    def __init__(
        self,
        runtime: AppRuntime,
        spec: AgentSpec,
        start: agent_pb2.ChatStart,
        info: CallInfo,
        span: CallSpan,
    ) -> None:
        self._runtime = runtime
        self._span = span
        self._spec = spec
        self._info = info
        self._session_id = start.session_id
        self._options = struct_to_dict(start.options)
        self._state: dict[str, Any] = {}
        self._out = Outbox()
        self._pending: deque[_Inbox] = deque()
        self._current: _Inbox | None = None
        self._task: asyncio.Task[None] | None = None
        self._ctx: AgentContext | None = None
        self._turns = 0
        self._cancel_requested = False
        self._client_done = False

    async def run(
        self, requests: AsyncIterator[agent_pb2.ChatRequest]
    ) -> AsyncGenerator[agent_pb2.ChatResponse, None]:
        """The conversation's events until the client closes its side and the last turn ends."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while (item := await self._out.get()) is not _CLOSED:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._out.close()  # a turn waiting for room must not wait for a reader that left
            reader.cancel()
            await self._stop_turn()

    # -- the client's messages ---------------------------------------------------

    async def _read(self, requests: AsyncIterator[agent_pb2.ChatRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("message")
                if kind == "input":
                    self._on_input(request.input)
                elif kind == "end_turn":
                    inbox = self._open_inbox()
                    if inbox is not None:
                        inbox.close()
                elif kind == "cancel_turn":
                    self._cancel_turn()
                else:
                    raise InvalidArgumentError(
                        f"unexpected ChatRequest {kind or 'without a message'!r}: start may only "
                        "be the first message; then send input, end_turn or cancel_turn",
                        reason="INVALID_CHAT_MESSAGE",
                    )
        except Exception as error:
            self._out.put_nowait(error)
            return
        self._client_done = True
        for inbox in (self._current, *self._pending):
            if inbox is not None:
                inbox.close()
        self._next_turn()

    def _open_inbox(self) -> _Inbox | None:
        """The inbox the client is filling: the last one, unless it ended its input."""
        last = self._pending[-1] if self._pending else self._current
        return last if last is not None and not last.closed else None

    def _on_input(self, item: agent_pb2.AgentInput) -> None:
        inbox = self._open_inbox()
        if inbox is not None:
            inbox.put(item)
            return
        self._pending.append(_Inbox(item))
        self._next_turn()

    def _cancel_turn(self) -> None:
        if self._task is None or self._task.done() or self._cancel_requested:
            return
        self._cancel_requested = True
        if self._ctx is not None:  # else the turn has not started, and sees the flag when it does
            mark_cancelled(self._ctx)
            self._task.cancel()

    # -- turns -------------------------------------------------------------------

    def _next_turn(self) -> None:
        """Starts the next turn if none runs; ends the stream when nothing is left to do."""
        if self._task is not None:
            return
        while self._pending:
            inbox = self._pending.popleft()
            first = inbox.take()
            if first is not None:
                self._start_turn(inbox, first)
                return
        if self._client_done:
            self._out.put_nowait(_CLOSED)

    def _start_turn(self, inbox: _Inbox, first: agent_pb2.AgentInput) -> None:
        self._turns += 1
        self._current = inbox
        self._cancel_requested = False
        with self._span.current():  # the turn's task inherits the call's span
            self._task = asyncio.create_task(self._turn(self._turns, inbox, first))

    async def _turn(self, number: int, inbox: _Inbox, first: agent_pb2.AgentInput) -> None:
        out = self._out

        async def emit(event: Event) -> None:
            message = response(agent_pb2.ChatResponse, event)
            message.turn = number
            await out.put(message)

        spec = self._spec
        try:
            given, arg = spec.parse_input(first)
            ctx = self._ctx = AgentContext(
                self._runtime,
                spec.name,
                self._info,
                spec.logger,
                emit,
                input=given,
                session_id=self._session_id,
                options=self._options,
                turn=number,
                state=self._state,
                more=inbox,
            )
            try:
                if not self._cancel_requested:
                    result = await spec.run(arg, ctx, emit)
            except asyncio.CancelledError:
                if not self._cancel_requested:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if self._cancel_requested:
                result = cancelled_result("the client cancelled the turn", ctx.tool_calls)
        except Exception as error:
            out.put_nowait(error)
            return
        self._span.agent_result(result)
        await emit(("result", result))
        self._turn_done(inbox)

    def _turn_done(self, inbox: _Inbox) -> None:
        self._task = self._ctx = self._current = None
        if inbox:  # unread input starts the next turn
            self._pending.appendleft(inbox)
        self._next_turn()

    async def _stop_turn(self) -> None:
        """Cancels the running turn when the stream ends early (client gone, deadline, error)."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if self._ctx is not None:
            mark_cancelled(self._ctx)
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_GRACE)
