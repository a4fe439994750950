"""Watchers of the server's notifications: one per ``McpService.Watch`` stream.

Notifications are level triggers ("the tool list changed: list it again"),
so a watcher keeps at most one pending copy of each: a slow reader never
makes the bridge buffer without bound. A resource update reaches only the
watchers that asked for that URI. Log messages (outside calls) are events,
not levels: a watcher that asked for them keeps the last ``MAX_LOGS``.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Iterable

from sidemesh.v1 import mcp_pb2

Event = mcp_pb2.WatchResponse
#: Log messages a watcher keeps for a slow reader; older ones are dropped.
MAX_LOGS = 100


def list_changed(kind: str) -> Event:
    """``tools_list_changed``, ``resources_list_changed`` or ``prompts_list_changed``."""
    event = Event()
    getattr(event, kind).SetInParent()
    return event


def resource_updated(uri: str) -> Event:
    """A subscribed resource changed."""
    return Event(resource_updated=mcp_pb2.ResourceUpdated(uri=uri))


class Watcher:
    """One stream's pending notifications, in order, each at most once."""

    def __init__(self, uris: Iterable[str], *, logs: bool = False) -> None:
        #: The resources whose updates this watcher receives.
        self.uris = frozenset(uris)
        #: Whether it receives the server's log messages outside calls.
        self.logs = logs
        self._pending: dict[bytes, Event] = {}
        self._logs: deque[Event] = deque(maxlen=MAX_LOGS)
        self._wake = asyncio.Event()
        self._closed = False

    def push(self, event: Event) -> None:
        """Queues ``event`` unless it is for another resource, or already pending."""
        if event.HasField("resource_updated") and event.resource_updated.uri not in self.uris:
            return
        if event.HasField("log"):
            if self.logs:
                self._logs.append(event)
                self._wake.set()
            return
        self._pending.setdefault(event.SerializeToString(deterministic=True), event)
        self._wake.set()

    def close(self) -> None:
        """Ends the stream: :meth:`next` returns ``None`` once the pending events are read."""
        self._closed = True
        self._wake.set()

    async def next(self) -> Event | None:
        """The next notification; ``None`` once closed."""
        while not self._pending and not self._logs:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        if self._logs:
            return self._logs.popleft()
        key = next(iter(self._pending))
        return self._pending.pop(key)


class Watchers:
    """Every open watcher, and how many want each resource (what to subscribe to)."""

    def __init__(self) -> None:
        self._all: set[Watcher] = set()
        self._uris: Counter[str] = Counter()
        self._closed = False

    @property
    def uris(self) -> frozenset[str]:
        """Every resource some watcher wants updates of."""
        return frozenset(self._uris)

    def add(self, uris: Iterable[str], *, logs: bool = False) -> tuple[Watcher, list[str]]:
        """A new watcher, and the URIs nobody watched until now (to subscribe to)."""
        watcher = Watcher(uris, logs=logs)
        if self._closed:
            watcher.close()
        self._all.add(watcher)
        new = [uri for uri in sorted(watcher.uris) if not self._uris[uri]]
        self._uris.update(watcher.uris)
        return watcher, new

    def remove(self, watcher: Watcher) -> list[str]:
        """Forgets ``watcher``; returns the URIs nobody watches any more (to unsubscribe)."""
        if watcher not in self._all:
            return []
        self._all.discard(watcher)
        self._uris.subtract(watcher.uris)
        gone = [uri for uri in sorted(watcher.uris) if self._uris[uri] <= 0]
        for uri in gone:
            del self._uris[uri]
        return gone

    def publish(self, event: Event) -> None:
        """Delivers ``event`` to every watcher that wants it."""
        for watcher in self._all:
            watcher.push(event)

    def close(self) -> None:
        """Ends every stream (the plugin is stopping); later watchers end at once."""
        self._closed = True
        for watcher in self._all:
            watcher.close()
