"""The mesh's event bus: lifecycle and call events, fanned out to ``WatchEvents`` streams."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2

from sidemesh.v1 import mesh_pb2

log = logging.getLogger("sidemesh.events")

_CALL_EVENTS = frozenset(
    {"call_started", "call_finished", "call_failed", "permission_denied", "unauthenticated"}
)
_CLOSED = object()


class _Subscriber:
    __slots__ = ("lifecycle_only", "plugin", "queue")

    def __init__(self, plugin: str, lifecycle_only: bool, size: int) -> None:
        self.plugin = plugin
        self.lifecycle_only = lifecycle_only
        self.queue: asyncio.Queue[Any] = asyncio.Queue(size)

    def wants(self, kind: str, involved: tuple[str, ...]) -> bool:
        if self.lifecycle_only and kind in _CALL_EVENTS:
            return False
        return not self.plugin or self.plugin in involved


class EventBus:
    """Numbers events, keeps the recent ones, and delivers them to subscribers.

    A subscriber that reads too slowly loses events (its queue is bounded); it
    sees the loss as a gap in ``sequence``. Publishing never blocks. Every
    event is kept in the history, calls made while nobody watched included
    (a replay shows them); an event's message is built only when someone
    receives it (``payload`` may be a function that builds it).
    """

    def __init__(self, history: int = 1000, queue_size: int = 10_000) -> None:
        self._history: collections.deque[_Recorded] = collections.deque(maxlen=history)
        self._queue_size = queue_size
        self._subscribers: set[_Subscriber] = set()
        self._call_watchers = 0
        self._sequence = 0

    @property
    def wants_call_events(self) -> bool:
        """Whether anyone listens for call events now."""
        return self._call_watchers > 0

    def emit(self, plugin: str, kind: str, payload: Any, *, also: tuple[str, ...] = ()) -> None:
        """Publishes an event about ``plugin``; ``kind`` names the oneof field ``payload`` fills.

        ``payload`` is the message, or a function of no arguments that makes it
        (for events that are often not watched). ``also`` names other plugins
        the event involves (a callback's caller).
        """
        self._sequence += 1
        recorded = _Recorded(self._sequence, time.time_ns(), plugin, kind, payload, (plugin, *also))
        self._history.append(recorded)
        for sub in self._subscribers:
            if sub.wants(kind, recorded.involved):
                # A full queue drops the event: the subscriber sees a gap in the sequence.
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(recorded.event())

    async def subscribe(
        self, *, plugin: str = "", lifecycle_only: bool = False, replay: int = 0
    ) -> AsyncIterator[mesh_pb2.WatchEventsResponse]:
        """Yields events as they happen (after up to ``replay`` recent ones) until :meth:`close`."""
        sub = _Subscriber(plugin, lifecycle_only, self._queue_size)
        if replay:
            recent = [r for r in self._history if sub.wants(r.kind, r.involved)]
            for recorded in recent[-replay:]:
                sub.queue.put_nowait(recorded.event())
        self._subscribers.add(sub)
        if not lifecycle_only:
            self._call_watchers += 1
        try:
            while True:
                item = await sub.queue.get()
                if item is _CLOSED:
                    return
                yield item
        finally:
            self._subscribers.discard(sub)
            if not lifecycle_only:
                self._call_watchers -= 1

    def close(self) -> None:
        """Ends every subscription (the orchestrator is shutting down)."""
        for sub in list(self._subscribers):
            while True:
                try:
                    sub.queue.put_nowait(_CLOSED)
                    break
                except asyncio.QueueFull:
                    sub.queue.get_nowait()


class _Recorded:
    """One event as the history keeps it; its message is made on first delivery."""

    __slots__ = ("_event", "involved", "kind", "payload", "plugin", "sequence", "time_ns")

    def __init__(
        self,
        sequence: int,
        time_ns: int,
        plugin: str,
        kind: str,
        payload: Any,
        involved: tuple[str, ...],
    ) -> None:
        self.sequence = sequence
        self.time_ns = time_ns
        self.plugin = plugin
        self.kind = kind
        self.payload = payload
        self.involved = involved
        self._event: mesh_pb2.WatchEventsResponse | None = None

    def event(self) -> mesh_pb2.WatchEventsResponse:
        if self._event is None:
            payload = self.payload() if callable(self.payload) else self.payload
            seconds, nanos = divmod(self.time_ns, 1_000_000_000)
            self._event = mesh_pb2.WatchEventsResponse(
                sequence=self.sequence,
                time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
                plugin=self.plugin,
                **{self.kind: payload},
            )
            self.payload = None
        return self._event
