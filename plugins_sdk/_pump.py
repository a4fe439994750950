"""``EventPump``: runs a handler as its own task and streams, in order, the events it emits.

A streaming handler emits events from deep inside plugin code (progress,
logs, tool calls an agent makes) while the servicer's async generator is the
only place that can send them. The handler runs as a task writing to a
queue; the servicer reads the queue. When the servicer stops early (the client
cancelled, the deadline passed), closing the pump cancels the task, so plugin
code sees ``CancelledError`` where it is waiting.
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

_DONE: Any = object()


class EventPump:
    """Streams what a handler emits, then its return value (see :meth:`next`)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[Event | None] | None = None
        self._on_cancel: Callable[[], None] | None = None

    def emit(self, event: Event) -> None:
        """Queues an event for the stream; the handler calls it (through its context)."""
        self._queue.put_nowait(event)

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
