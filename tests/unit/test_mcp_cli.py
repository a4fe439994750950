"""``sidemesh mcp`` in-process: an MCP client of either protocol era hears when the mesh's
catalog changes (``notifications/tools/list_changed``, or a ``subscriptions/listen`` event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.shared.subscriptions import ToolsListChanged

from orchestrator.gateway import _server as mesh_mcp
from sidemesh.core import to_struct
from sidemesh.v1 import tool_pb2


def descriptor(qualified: str) -> tool_pb2.ToolDescriptor:
    return tool_pb2.ToolDescriptor(
        name=qualified.partition("/")[2],
        qualified_name=qualified,
        input_schema=to_struct({"type": "object"}),
    )


class FakeMesh:
    """The part of ``AsyncMeshClient`` that ``sidemesh mcp`` reads the catalog with."""

    def __init__(self, *tools: str) -> None:
        self.tools = [descriptor(t) for t in tools]

    async def list_tools(self) -> list[tool_pb2.ToolDescriptor]:
        return list(self.tools)

    async def list_agents(self) -> list[Any]:
        return []

    async def list_plugins(self) -> list[Any]:
        return []

    async def watch_events(self, **_: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()  # no events: the poll finds the change
        yield None


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh_mcp, "POLL_INTERVAL", 0.05)


async def test_a_2025_client_gets_tools_list_changed() -> None:
    # (In-process the SDK declares its default capabilities; over stdio `sidemesh mcp`
    # declares tools.listChanged, which the integration test checks.)
    mesh = FakeMesh("tools-demo/add")
    bridge = mesh_mcp.MeshMcpServer(mesh)  # type: ignore[arg-type]
    changed = asyncio.Event()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with Client(bridge.server, mode="legacy", message_handler=on_message) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["tools-demo.add"]
        follow = asyncio.create_task(bridge.follow_catalog())
        try:
            await asyncio.sleep(0.2)
            assert not changed.is_set()  # nothing changed yet
            mesh.tools.append(descriptor("tools-demo/sub"))
            await asyncio.wait_for(changed.wait(), 5)
        finally:
            follow.cancel()
        names = [t.name for t in (await client.list_tools(cache_mode="bypass")).tools]
    assert names == ["tools-demo.add", "tools-demo.sub"]


async def test_a_2026_client_gets_a_listen_event() -> None:
    mesh = FakeMesh("tools-demo/add")
    bridge = mesh_mcp.MeshMcpServer(mesh)  # type: ignore[arg-type]
    async with Client(bridge.server) as client:
        assert client.protocol_version == "2026-07-28"
        await client.list_tools()
        follow = asyncio.create_task(bridge.follow_catalog())
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                mesh.tools.pop()
                event = await asyncio.wait_for(anext(aiter(subscription)), 5)
        finally:
            follow.cancel()
    assert isinstance(event, ToolsListChanged)
