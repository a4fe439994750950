"""The server's notifications, delivered to every ``Watch`` stream.

The two protocol eras deliver them differently:

- **2025 and before** (``initialize`` handshake): the server sends list
  changes unasked, and resource updates after ``resources/subscribe``; they
  arrive through the SDK's message handler.
- **2026** (stateless): the client opts in with a ``subscriptions/listen``
  stream naming what it wants (list changes, resource URIs); the bridge keeps
  one open per session and reopens it when the watched URIs change.

A tool list change is acted on first: the bridge lists the tools again, and
only then tells watchers ``tools_list_changed``, so the orchestrator's
re-``Describe`` sees the new list. After a restart, watchers hear that every
list the server has changed, and subscriptions are made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import mcp_types as types
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    Subscription,
    SubscriptionLost,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from sidecars.mcp._catalog import list_all_tools
from sidecars.mcp._errors import to_status
from sidecars.mcp._watchers import Event, Watcher, Watchers, list_changed, resource_updated
from sidemesh.core import UnimplementedError
from sidemesh.v1 import common_pb2, mcp_pb2

if TYPE_CHECKING:
    from sidecars.mcp._link import ServerLink

log = logging.getLogger("sidecars.mcp")

#: Seconds before listening again after the server ended a ``subscriptions/listen`` stream.
RELISTEN_DELAY = 1.0
_LIST_KINDS = ("tools_list_changed", "resources_list_changed", "prompts_list_changed")


class Notifications:
    """Turns the server's notifications into ``WatchResponse`` events for the watchers."""

    def __init__(self, link: ServerLink, watchers: Watchers) -> None:
        self._link = link
        self._watchers = watchers
        self._modern = False
        self._unreadable = 0  # lines of its stdout that were not JSON-RPC
        self._refresh: asyncio.Task[None] | None = None
        self._refresh_wanted = False
        self._filter_changed = asyncio.Event()

    # -- sessions --------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, client: Client, *, restarted: bool) -> AsyncIterator[None]:
        """Delivers the notifications of ``client``'s session while the block runs."""
        self._modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
        listener = asyncio.create_task(self._listen(client)) if self._modern else None
        try:
            if not self._modern:
                for uri in sorted(self._watchers.uris):
                    await self._subscribe(client, uri, quiet=True)
            if restarted:
                caps = self._link.info.capabilities
                for kind, present in zip(
                    _LIST_KINDS, (caps.tools, caps.resources, caps.prompts), strict=True
                ):
                    if present:
                        self._publish(list_changed(kind))  # tools: already listed again
            if self._refresh_wanted:
                self._start_refresh(client)
            yield
        finally:
            for task in (listener, self._refresh):
                if task is not None:
                    task.cancel()
            self._refresh = None

    async def on_message(self, message: IncomingMessage) -> None:
        """The SDK's message handler: notifications of a 2025-era session."""
        if isinstance(message, Exception):
            self._unreadable += 1
            if self._unreadable in (1, 10, 100) or self._unreadable % 1000 == 0:
                log.warning(
                    "the MCP server wrote a line on its stdout that is not a JSON-RPC message "
                    "(%d so far; MCP servers must log to stderr): %s",
                    self._unreadable, unreadable(message),
                )  # fmt: skip
            return
        if self._modern:
            return  # a 2026 session's notifications come from its listen stream
        if isinstance(message, types.ToolListChangedNotification):
            self.tools_changed()
        elif isinstance(message, types.ResourceListChangedNotification):
            self._publish(list_changed("resources_list_changed"))
        elif isinstance(message, types.PromptListChangedNotification):
            self._publish(list_changed("prompts_list_changed"))
        elif isinstance(message, types.ResourceUpdatedNotification):
            self._publish(resource_updated(message.params.uri))

    def _publish(self, event: Event) -> None:
        log.debug("MCP notification: %s", event.WhichOneof("event"))
        self._watchers.publish(event)

    # -- the tool list ---------------------------------------------------------------

    def tools_changed(self) -> None:
        """Lists the tools again (once, however many changes arrive meanwhile), then tells."""
        self._refresh_wanted = True
        client = self._link.client
        if client is not None and (self._refresh is None or self._refresh.done()):
            self._start_refresh(client)

    def _start_refresh(self, client: Client) -> None:
        self._refresh = asyncio.create_task(self._refresh_tools(client), name="mcp-tools-refresh")

    async def _refresh_tools(self, client: Client) -> None:
        try:
            while self._refresh_wanted:
                self._refresh_wanted = False
                async with asyncio.timeout(self._link.spec.request_timeout):
                    tools = await list_all_tools(client.session)
                self._link.catalog.replace(tools)
                log.info("the MCP server's tool list changed: %d tools", len(tools))
        except Exception as exc:  # the session is ending, most likely; the next one lists again
            log.warning("could not list the MCP server's tools again: %s", exc)
            return
        self._publish(list_changed("tools_list_changed"))

    # -- watchers and resource subscriptions -------------------------------------------

    async def watch(self, uris: list[str], timeout: float, *, logs: bool = False) -> Watcher:
        """A new watcher of the notifications, of updates to ``uris``, and of logs (``logs``)."""
        if uris and not self._link.info.capabilities.resources_subscribe:
            raise UnimplementedError(
                f"the MCP server of plugin {self._link.plugin!r} does not support resource "
                "subscriptions (capability resources.subscribe)",
                reason="MCP_NO_SUBSCRIPTIONS",
            )
        watcher, new = self._watchers.add(uris, logs=logs)
        try:
            if new and self._modern:
                self._filter_changed.set()
            elif new:
                client = await self._link.ready_client(timeout, "resources/subscribe")
                for uri in new:
                    await self._subscribe(client, uri)
        except BaseException:
            await self.unwatch(watcher)
            raise
        return watcher

    def publish_log(self, record: common_pb2.LogRecord) -> None:
        """A log message of the server that belongs to no call, for the watchers of logs."""
        self._watchers.publish(mcp_pb2.WatchResponse(log=record))

    async def unwatch(self, watcher: Watcher) -> None:
        """Forgets ``watcher``; unsubscribes from resources nobody watches any more."""
        watcher.close()
        gone = self._watchers.remove(watcher)
        if gone and self._modern:
            self._filter_changed.set()
        elif gone and (client := self._link.client) is not None:
            for uri in gone:
                with contextlib.suppress(Exception):
                    await client.session.send_request(
                        types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri)),
                        types.EmptyResult,
                        request_read_timeout_seconds=self._link.spec.request_timeout,
                    )

    async def _subscribe(self, client: Client, uri: str, *, quiet: bool = False) -> None:
        """``resources/subscribe`` (2025 era); the SDK marks the call deprecated for 2026 only."""
        try:
            await client.session.send_request(
                types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)),
                types.EmptyResult,
                request_read_timeout_seconds=self._link.spec.request_timeout,
            )
        except Exception as exc:
            if quiet:
                log.warning("could not subscribe to %s again: %s", uri, exc)
                return
            raise to_status(exc, f"resources/subscribe {uri}") or exc from None

    # -- 2026: subscriptions/listen -------------------------------------------------------

    async def _listen(self, client: Client) -> None:
        """Keeps a ``subscriptions/listen`` stream open with what the watchers need."""
        caps = self._link.info.capabilities
        flags = {
            "tools_list_changed": caps.tools_list_changed,
            "resources_list_changed": caps.resources_list_changed,
            "prompts_list_changed": caps.prompts_list_changed,
        }
        while True:
            self._filter_changed.clear()
            uris = sorted(self._watchers.uris) if caps.resources_subscribe else []
            if not any(flags.values()) and not uris:
                await self._filter_changed.wait()
                continue
            try:
                async with client.listen(**flags, resource_subscriptions=uris) as subscription:
                    await self._consume_until_changed(subscription)
            except (MCPError, SubscriptionLost, TimeoutError, RuntimeError) as exc:
                log.warning("the MCP notification stream ended (%s); listening again", exc)
                await asyncio.sleep(RELISTEN_DELAY)

    async def _consume_until_changed(self, subscription: Subscription) -> None:
        consume = asyncio.create_task(self._consume(subscription))
        changed = asyncio.create_task(self._filter_changed.wait())
        try:
            done, _ = await asyncio.wait({consume, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            consume.cancel()
            changed.cancel()
        if consume in done and not consume.cancelled():
            consume.result()  # raises SubscriptionLost
            await asyncio.sleep(RELISTEN_DELAY)  # the server closed it gracefully

    async def _consume(self, subscription: Subscription) -> None:
        async for event in subscription:
            if isinstance(event, ToolsListChanged):
                self.tools_changed()
            elif isinstance(event, ResourcesListChanged):
                self._publish(list_changed("resources_list_changed"))
            elif isinstance(event, PromptsListChanged):
                self._publish(list_changed("prompts_list_changed"))
            elif isinstance(event, ResourceUpdated):
                self._publish(resource_updated(event.uri))


def unreadable(error: Exception) -> str:
    """What was wrong with a line the server wrote, in one line (not a pydantic traceback)."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return f"{str(first.get('input'))[:200]!r}"
        except (IndexError, TypeError, AttributeError):
            pass
    text = str(error).splitlines()
    return text[0][:200] if text else type(error).__name__
