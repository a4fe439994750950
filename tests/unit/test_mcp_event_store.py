"""The HTTP endpoint's event store: what a client that reconnects with ``Last-Event-ID`` gets."""

from __future__ import annotations

import mcp_types as types
from mcp.server.streamable_http import EventMessage

from orchestrator.gateway._event_store import MemoryEventStore


def note(n: int) -> types.JSONRPCNotification:
    return types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress",
                                     params={"progress": n})  # fmt: skip


async def replay(store: MemoryEventStore, after: str) -> tuple[str | None, list[EventMessage]]:
    sent: list[EventMessage] = []

    async def send(event: EventMessage) -> None:
        sent.append(event)

    return await store.replay_events_after(after, send), sent


async def test_a_reconnecting_client_gets_the_events_of_its_stream_after_its_last_id() -> None:
    store = MemoryEventStore(history=10)
    first = await store.store_event("call-1", note(1))
    await store.store_event("call-2", note(100))  # another stream: not replayed
    await store.store_event("call-1", None)  # a priming event: no message to send
    await store.store_event("call-1", note(2))
    stream, sent = await replay(store, first)
    assert stream == "call-1"
    assert [e.message.params for e in sent] == [{"progress": 2}]  # type: ignore[union-attr]
    assert all(e.event_id for e in sent)


async def test_history_is_bounded_and_unknown_ids_replay_nothing() -> None:
    store = MemoryEventStore(history=2, max_streams=1)
    old = await store.store_event("s", note(1))
    for n in range(2, 5):
        await store.store_event("s", note(n))
    assert await replay(store, old) == (None, [])  # fell out of the history
    await store.store_event("t", note(9))  # a second stream pushes the first out
    assert await replay(store, "4") == (None, [])
    assert await replay(store, "not-a-number") == (None, [])
