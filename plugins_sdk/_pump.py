"""``EventPump``: runs a handler as its own task and streams, in order, the events it emits.

A streaming handler emits events from deep inside plugin code (progress,
logs, tool calls an agent makes) while the servicer's async generator is the
only place that can send them. The handler runs as a task writing to a
queue; the servicer reads the queue. When the servicer stops early (the client
cancelled, the deadline passed), closing the pump cancels the task, so plugin
code sees ``CancelledError`` where it is waiting.

**Backpressure.** The queue holds at most :data:`OUTBOX_LIMIT` events: a
handler that emits faster than the caller reads waits in ``await emit(...)``
(``ctx.report_progress``, ``yield`` in an agent) until the stream takes the
next one. gRPC sends a message only as the caller's HTTP/2 flow-control window
allows, so a slow reader slows the plugin down instead of filling its memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from plugins_sdk._context import Event

log = logging.getLogger("plugins_sdk")

#: How long a cancelled handler may take to finish its ``finally`` blocks before it is left.
CANCEL_GRACE = 5.0
#: Events a stream holds for its caller before the handler has to wait.
OUTBOX_LIMIT = 16

_DONE: Any = object()


class Outbox:
    """A queue of events for one stream that makes producers wait when it is full.

    ``put`` waits while :data:`OUTBOX_LIMIT` items are queued; ``put_nowait``
    (for the stream's own end markers) and a closed outbox never wait.
    """

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._limit = limit
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False

    async def put(self, item: Any) -> None:
        """Queues ``item``; waits first while the outbox is full."""
        while self._queue.qsize() >= self._limit and not self._closed:
            self._room.clear()
            await self._room.wait()
        if not self._closed:
            self._queue.put_nowait(item)

    def put_nowait(self, item: Any) -> None:
        """Queues ``item`` at once (an end marker, an error)."""
        self._queue.put_nowait(item)

    def offer(self, item: Any) -> bool:
        """Queues ``item`` if there is room; False (dropped) when the outbox is full."""
        if self._queue.qsize() >= self._limit or self._closed:
            return False
        self._queue.put_nowait(item)
        return True

    async def get(self) -> Any:
        """The next item."""
        item = await self._queue.get()
        if self._queue.qsize() < self._limit:
            self._room.set()
        return item

    def close(self) -> None:
        """Nobody reads any more: producers stop waiting, and what they put is dropped."""
        self._closed = True
        self._room.set()


class EventPump:
    """Streams what a handler emits, then its return value (see :meth:`next`)."""

    def __init__(self) -> None:
        self._queue = Outbox()
        self._task: asyncio.Task[Event | None] | None = None
        self._on_cancel: Callable[[], None] | None = None

    async def emit(self, event: Event) -> None:
        """Queues an event for the stream, waiting while the stream is behind."""
        await self._queue.put(event)

    def offer(self, event: Event) -> bool:
        """Queues an event that may be dropped when the stream is behind (progress of a
        source that cannot wait, such as a bridged MCP server's notifications)."""
        return self._queue.offer(event)

    def start(
        self,
        handler: Coroutine[Any, Any, Event | None],
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        """Starts ``handler``; its returned event, if any, is the stream's last."""
        self._on_cancel = on_cancel
        self._task = asyncio.create_task(handler)
        self._task.add_done_callback(lambda _: self._queue.put_nowait(_DONE))

    async def next(self) -> Event | None:
        """The next event; ``None`` at the end. Raises what the handler raised."""
        if self._task is None:
            return None
        item = await self._queue.get()
        if item is not _DONE:
            return item  # type: ignore[no-any-return]
        task, self._task = self._task, None
        return task.result()

    async def close(self) -> None:
        """Cancels the handler if it still runs and gives it a moment to clean up."""
        task, self._task = self._task, None
        self._queue.close()
        if task is None:
            return
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: the stream ended for another reason
            return
        if self._on_cancel is not None:
            self._on_cancel()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE)
        if not done:
            log.warning("a cancelled handler still runs after %.0f s; leaving it", CANCEL_GRACE)
        elif not task.cancelled() and task.exception() is not None:
            log.debug("a cancelled handler raised", exc_info=task.exception())
