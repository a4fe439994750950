"""``ServerLink``: the bridge's connection to its MCP server, kept up for the bridge's life.

One session at a time, through the official SDK's ``mcp.Client`` in its
``auto`` mode: it probes the 2026 stateless protocol (``server/discover``) and
falls back to the ``initialize`` handshake, so servers of both eras work.

- **Start.** The first session must answer its first request and list its
  tools within the startup timeout, else ``start`` raises ``StartupError``
  (the sidecar exits non-zero with that message: the plugin's error).
- **Restart.** When a session ends (the server exited), calls in flight fail
  with ``UNAVAILABLE`` (the SDK wakes them when the connection closes) and a
  new session starts after a short backoff; its tools are listed again and
  watchers are told every list changed. Calls arriving meanwhile wait for it,
  within their deadline. A server that keeps failing right away makes the
  link give up (``failed``), and the sidecar exits for the orchestrator's
  own supervision to take over.
- **Notifications** go to :class:`~sidecars.mcp._notifications.Notifications`;
  the server's requests (sampling, elicitation, roots) and log messages to
  the call that caused them (:mod:`sidecars.mcp._asking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import mcp_types as types
from mcp import Client
from mcp.shared.exceptions import MCPError

from sidecars.mcp._asking import Callbacks, InFlight
from sidecars.mcp._catalog import ServerCatalog, list_all_tools
from sidecars.mcp._convert import server_info
from sidecars.mcp._errors import Lookup, server_gone, to_status
from sidecars.mcp._notifications import Notifications
from sidecars.mcp._process import SERVER_LOG, SpawnError
from sidecars.mcp._spec import RUNTIME, ServerSpec
from sidecars.mcp._transport import ServerTransport
from sidecars.mcp._watchers import Watchers
from sidemesh.core import UnavailableError
from sidemesh.v1 import mcp_pb2

log = logging.getLogger("sidecars.mcp")
T = TypeVar("T")

CLIENT_INFO = types.Implementation(name="sidemesh-mcp-bridge", version=RUNTIME.rpartition("/")[2])
#: Restart backoff: first delay, cap (seconds).
BACKOFF_INITIAL, BACKOFF_MAX = 0.2, 5.0
#: A session that lasted this long (seconds) was healthy: the backoff starts over.
STABLE_UPTIME = 10.0
#: Sessions in a row that fail this fast before the link gives up.
MAX_QUICK_FAILURES = 5
#: Extra time (seconds) the SDK's own request timeout gets before the call's task is cancelled.
_TIMEOUT_SLACK = 0.5
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO,
               "warning": logging.WARNING}  # fmt: skip


class StartupError(Exception):
    """The MCP server could not be started or did not answer; the message says why."""


class ServerLink:
    """The current session with the MCP server, its catalog and its identity."""

    def __init__(self, spec: ServerSpec, plugin: str, watchers: Watchers) -> None:
        self.spec = spec
        self.plugin = plugin
        #: The server's tools, refreshed on every session and list change.
        self.catalog = ServerCatalog(plugin)
        #: The server's identity and capabilities (``McpServerInfo``).
        self.info = mcp_pb2.McpServerInfo()
        #: Set when the link gave up on the server (it keeps failing); see ``failure``.
        self.failed = asyncio.Event()
        self.failure = ""
        self.notifications = Notifications(self, watchers)
        #: The calls in flight, which the server's requests and log messages go to.
        self.in_flight = InFlight(plugin)
        self._callbacks = Callbacks(
            self.in_flight, _log_server_message, self.notifications.publish_log
        )
        self._client: Client | None = None
        #: Set when the current session's transport has closed (the server died).
        self._closed: asyncio.Event | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def client(self) -> Client | None:
        """The client of the current session; ``None`` between sessions."""
        return self._client

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Starts the first session; returns once it is ready, or raises ``StartupError``."""
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(first), name="mcp-link")
        try:
            await first
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Ends the session and stops the server (its process group is killed)."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, first: asyncio.Future[None]) -> None:
        quick_failures = 0
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                await self._session(first)
            except Exception as exc:
                reason = _describe_failure(exc, self.spec)
                if not first.done():
                    first.set_exception(StartupError(reason))
                    return
                log.error("MCP session failed: %s", reason)
            if self._stop.is_set():
                return
            quick = time.monotonic() - began < STABLE_UPTIME
            quick_failures = quick_failures + 1 if quick else 0
            if quick_failures >= MAX_QUICK_FAILURES:
                self.failure = (
                    f"the MCP server ({self.spec.display}) failed {quick_failures} times in a "
                    "row right after starting; giving up (see its stderr above)"
                )
                log.error("%s", self.failure)
                self.failed.set()
                return
            delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** max(0, quick_failures - 1))
            log.warning("the MCP server's session ended; restarting it in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _session(self, first: asyncio.Future[None]) -> None:
        """One session: connect, list the tools, serve until the server goes or we stop."""
        transport = ServerTransport(self.spec)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            transport.abort()  # ends the stuck handshake: the pending request fails at once

        timer = asyncio.get_running_loop().call_later(self.spec.startup_timeout, expire)
        client = Client(
            transport, mode="auto", cache=None, client_info=CLIENT_INFO,
            message_handler=self.notifications.on_message,
            logging_callback=self._callbacks.logging, log_level="info",
            sampling_callback=self._callbacks.sampling,
            elicitation_callback=self._callbacks.elicitation,
            list_roots_callback=self._callbacks.roots,
        )  # fmt: skip
        try:
            async with client:
                tools = await list_all_tools(client.session)
                timer.cancel()
                self._install(client, tools, transport.closed)
                restarted = first.done()
                if not restarted:
                    first.set_result(None)
                async with self.notifications.session(client, restarted=restarted):
                    await _first_of(transport.closed, self._stop)
        except Exception as exc:
            if expired:
                raise StartupError(
                    f"the MCP server ({self.spec.display}) did not answer its first request "
                    f"within {self.spec.startup_timeout:g}s: is it an MCP server speaking "
                    f"{self.spec.transport}? (its stderr is above)"
                ) from exc
            raise
        finally:
            timer.cancel()
            self._ready.clear()
            self._client = None

    def _install(self, client: Client, tools: list[types.Tool], closed: asyncio.Event) -> None:
        """Makes ``client`` the current session, with its identity and tools."""
        self._closed = closed
        self.catalog.replace(tools)
        self.info = server_info(
            client.server_info, client.protocol_version, client.instructions,
            client.server_capabilities, self.plugin,
        )  # fmt: skip
        self._client = client
        self._ready.set()
        log.info(
            "MCP server %s %s ready: protocol %s, %d tools",
            self.info.name, self.info.version, self.info.protocol_version, len(self.catalog),
        )  # fmt: skip

    # -- requests ----------------------------------------------------------------

    async def ready_client(self, timeout: float, what: str) -> Client:
        """The current session's client, waiting up to ``timeout`` for a restart to finish."""
        if self._closed is not None and self._closed.is_set():
            # The server died; the session loop has not noticed yet. Calls wait for the
            # restart instead of reaching a dead session.
            self._client = None
            self._ready.clear()
        client = self._client
        if client is not None:
            return client
        if self.failed.is_set() or self._stop.is_set():
            raise UnavailableError(f"{what}: the MCP server is not running", reason="MCP_STOPPED")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        if self._client is None:
            raise UnavailableError(
                f"{what}: the MCP server is restarting and was not back within {timeout:g}s",
                reason="MCP_RESTARTING",
                retry_delay=BACKOFF_MAX,
            )
        return self._client

    async def request(
        self,
        what: str,
        send: Callable[[Client, float], Awaitable[T]],
        timeout: float,
        *,
        lookup: Lookup = "",
    ) -> T:
        """Runs ``send(client, seconds_left)``, mapping MCP failures to gRPC statuses.

        ``send`` should hand the seconds left to the SDK as the MCP request
        timeout; this task is cancelled a little later (that sends MCP's
        cancellation too). ``lookup``: see :func:`~sidecars.mcp._errors.to_status`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        client = await self.ready_client(timeout, what)
        try:
            async with asyncio.timeout_at(deadline + _TIMEOUT_SLACK):
                with self.in_flight.request():
                    return await send(client, max(0.001, deadline - loop.time()))
        except Exception as exc:
            error = _leaf(exc)
            if self._client is not client and not isinstance(error, MCPError | TimeoutError):
                raise server_gone(what) from None  # the session went away under the call
            mapped = to_status(error, what, lookup=lookup)
            if mapped is None:
                raise
            raise mapped from None


async def _first_of(*events: asyncio.Event) -> None:
    """Waits until one of ``events`` is set."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _log_server_message(params: types.LoggingMessageNotificationParams) -> None:
    """The server's MCP log messages go to the plugin's log (they belong to no single call)."""
    level = _LOG_LEVELS.get(params.level, logging.ERROR)
    where = f"[{params.logger}] " if params.logger else ""
    SERVER_LOG.log(level, "%s%s", where, params.data)


def _leaf(error: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as anyio task groups raise them."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _describe_failure(error: BaseException, spec: ServerSpec) -> str:
    leaf = _leaf(error)
    if isinstance(leaf, StartupError | SpawnError):
        return str(leaf)
    if isinstance(leaf, MCPError) and leaf.code == types.CONNECTION_CLOSED:
        return (
            f"the MCP server ({spec.display}) exited or closed its output before it answered; "
            "its stderr lines above say why"
        )
    if isinstance(leaf, OSError):
        return f"cannot start the MCP server ({spec.display}): {leaf}"
    return f"the MCP server ({spec.display}) failed: {type(leaf).__name__}: {leaf}"
