"""How targets resolve (names, ambiguity, capabilities, argument checks) and how events fan out."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import json_format, struct_pb2

from clients import InvalidArgumentError, NotFoundError
from orchestrator._catalog import Catalog
from orchestrator._events import EventBus
from sidemesh.v1 import agent_pb2, mesh_pb2, tool_pb2


def _tool(name: str, schema: dict[str, object] | None = None) -> tool_pb2.ToolDescriptor:
    descriptor = tool_pb2.ToolDescriptor(name=name)
    if schema is not None:
        json_format.ParseDict(schema, descriptor.input_schema)
    return descriptor


@pytest.fixture
def catalog() -> Catalog:
    c = Catalog()
    c.set_plugin(
        "tools-demo",
        [],
        [
            _tool("add", {"type": "object", "required": ["a", "b"],
                          "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}),
            _tool("search"),
        ],
    )  # fmt: skip
    c.set_plugin("web", [agent_pb2.AgentDescriptor(name="helper", capabilities=["browse"])],
                 [_tool("search")])  # fmt: skip
    return c


def test_short_names_resolve_when_unique_and_qualified_names_always(catalog: Catalog) -> None:
    assert catalog.tool("add").qualified == "tools-demo/add"
    assert catalog.tool("web/search").plugin == "web"
    assert catalog.agent("", capability="browse").qualified == "web/helper"


def test_an_ambiguous_short_name_lists_the_qualified_choices(catalog: Catalog) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        catalog.tool("search")
    assert "tools-demo/search" in info.value.message and "web/search" in info.value.message
    assert info.value.reason == "AMBIGUOUS_TARGET"


def test_unknown_and_malformed_names(catalog: Catalog) -> None:
    with pytest.raises(NotFoundError) as info:
        catalog.tool("tools-demo/ad")
    assert "'tools-demo/add'" in info.value.message
    with pytest.raises(InvalidArgumentError):
        catalog.tool("a/b/c")
    with pytest.raises(NotFoundError) as cap:
        catalog.agent("", capability="cook")
    assert "known capabilities: browse" in cap.value.message


def test_arguments_are_checked_against_the_schema_with_field_paths(catalog: Catalog) -> None:
    entry = catalog.tool("tools-demo/add")
    good = struct_pb2.Struct()
    good.update({"a": 1, "b": 2})
    entry.check_arguments(good)  # numbers arrive as doubles: 1.0 is an integer
    bad = struct_pb2.Struct()
    bad.update({"a": "one"})
    with pytest.raises(InvalidArgumentError) as info:
        entry.check_arguments(bad)
    fields = sorted(v.field for v in info.value.field_violations)
    assert fields == ["arguments.a", "arguments.b"]


def test_a_plugin_that_goes_away_takes_its_names_with_it(catalog: Catalog) -> None:
    catalog.remove_plugin("web")
    assert catalog.tool("search").qualified == "tools-demo/search"  # unique again
    assert [t.qualified_name for t in catalog.tools()] == ["tools-demo/add", "tools-demo/search"]


async def test_events_are_numbered_replayed_and_filtered() -> None:
    bus = EventBus(history=10)
    bus.emit("a", "replica_started", mesh_pb2.ReplicaStarted(replica=0, pid=1))
    bus.emit("b", "call_started", mesh_pb2.CallStarted(call_id="x"))
    bus.emit("a", "replica_ready", mesh_pb2.ReplicaReady(replica=0))
    seen = []
    async for event in bus.subscribe(plugin="a", replay=5):
        seen.append((event.sequence, event.WhichOneof("event")))
        if len(seen) == 2:
            break
    assert seen == [(1, "replica_started"), (3, "replica_ready")]


async def test_a_slow_subscriber_loses_events_visibly_and_publishing_never_blocks() -> None:
    bus = EventBus(queue_size=2)
    subscription = bus.subscribe(lifecycle_only=True)
    first = asyncio.ensure_future(anext(subscription))
    await asyncio.sleep(0)  # subscribed
    for i in range(5):  # the queue holds 2: events 3 to 5 are dropped for this subscriber
        bus.emit("p", "replica_started", mesh_pb2.ReplicaStarted(replica=i))
    received = [(await first).sequence, (await anext(subscription)).sequence]
    bus.emit("p", "replica_started", mesh_pb2.ReplicaStarted(replica=6))
    received.append((await anext(subscription)).sequence)
    assert received == [1, 2, 6]  # the gap in the numbering shows the loss
    bus.close()


async def test_call_events_are_built_only_while_someone_watches_them() -> None:
    bus = EventBus()
    assert not bus.wants_call_events
    lifecycle = bus.subscribe(lifecycle_only=True)
    calls = bus.subscribe()
    pending = [asyncio.ensure_future(anext(lifecycle)), asyncio.ensure_future(anext(calls))]
    await asyncio.sleep(0)
    assert bus.wants_call_events
    bus.close()
    await asyncio.gather(*pending, return_exceptions=True)
