"""The MCP plugins' notifications, for the gateway's clients: list changes and resource updates.

One ``McpService.Watch`` stream per MCP plugin, naming the resource URIs some
client subscribed to, and asking for the log messages outside calls; it is
opened again when that set changes, and after the plugin restarts. What it
streams goes to the gateway's ``on_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from clients import AsyncMeshClient
from sidemesh.core import SidemeshError
from sidemesh.v1 import mcp_pb2

log = logging.getLogger("sidemesh.mcp")

#: Seconds before a Watch that ended is opened again.
REWATCH_DELAY = 2.0

OnEvent = Callable[[str, mcp_pb2.WatchResponse], Awaitable[None]]


class Watches:
    """Keeps one Watch per MCP plugin open, with the URIs subscribed on it."""

    def __init__(self, mesh: AsyncMeshClient, on_event: OnEvent) -> None:
        self._mesh = mesh
        self._on_event = on_event
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Subscribed URIs per plugin, counted (several clients may subscribe to one).
        self._uris: dict[str, Counter[str]] = {}

    def follow(self, servers: list[str]) -> None:
        """Watches exactly ``servers`` (the MCP plugins the mesh has now)."""
        for server in set(self._tasks) - set(servers):
            self._tasks.pop(server).cancel()
        for server in servers:
            if server not in self._tasks:
                self._start(server)

    def subscribe(self, server: str, uri: str) -> None:
        counts = self._uris.setdefault(server, Counter())
        counts[uri] += 1
        if counts[uri] == 1:
            self._restart(server)

    def unsubscribe(self, server: str, uri: str) -> None:
        counts = self._uris.get(server)
        if not counts or uri not in counts:
            return
        counts[uri] -= 1
        if counts[uri] <= 0:
            del counts[uri]
            self._restart(server)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def _restart(self, server: str) -> None:
        task = self._tasks.pop(server, None)
        if task is not None:
            task.cancel()
        self._start(server)

    def _start(self, server: str) -> None:
        self._tasks[server] = asyncio.create_task(self._watch(server), name=f"mcp-watch-{server}")

    async def _watch(self, server: str) -> None:
        while True:
            uris = sorted(self._uris.get(server, ()))
            try:
                async with self._mesh.watch_mcp(server, uris, logs=True) as stream:
                    async for event in stream:
                        with contextlib.suppress(Exception):
                            await self._on_event(server, event)
            except SidemeshError as err:
                if err.code.name == "UNIMPLEMENTED" and uris:
                    log.warning("MCP server %s cannot be subscribed to: %s", server, err)
                    self._uris.pop(server, None)
                    continue
                log.debug("watch of MCP server %s ended: %s", server, err)
            await asyncio.sleep(REWATCH_DELAY)
