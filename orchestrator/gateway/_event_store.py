"""Resumable SSE streams: the HTTP endpoint's events kept in memory, per stream, for a while.

MCP's streamable HTTP lets a client that lost its SSE connection reconnect
with ``Last-Event-ID`` and get what it missed. The SDK asks an
``EventStore`` for that; this one keeps the last ``history`` events of each
stream (and at most ``max_streams`` streams), which covers a dropped
connection, not a mesh restart.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage

#: Streams whose events are kept; the least recently written are forgotten first.
MAX_STREAMS = 1000


class MemoryEventStore(EventStore):
    """The last ``history`` events of each of the ``max_streams`` latest streams."""

    def __init__(self, history: int, max_streams: int = MAX_STREAMS) -> None:
        self._history = history
        self._max_streams = max_streams
        self._ids = itertools.count(1)
        self._streams: OrderedDict[StreamId, deque[tuple[int, JSONRPCMessage | None]]] = (
            OrderedDict()
        )
        self._stream_of: dict[int, StreamId] = {}

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        number = next(self._ids)
        events = self._streams.get(stream_id)
        if events is None:
            events = self._streams[stream_id] = deque()
            while len(self._streams) > self._max_streams:
                _, dropped = self._streams.popitem(last=False)
                for old, _ in dropped:
                    self._stream_of.pop(old, None)
        else:
            self._streams.move_to_end(stream_id)
        events.append((number, message))
        self._stream_of[number] = stream_id
        while len(events) > self._history:
            old, _ = events.popleft()
            self._stream_of.pop(old, None)
        return str(number)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        try:
            after = int(last_event_id)
        except ValueError:
            return None
        stream_id = self._stream_of.get(after)
        if stream_id is None:
            return None
        for number, message in list(self._streams.get(stream_id, ())):
            if number > after and message is not None:
                await send_callback(EventMessage(message, str(number)))
        return stream_id
