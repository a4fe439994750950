"""One session's transport to the MCP server: the SDK's stdio or streamable HTTP client.

``ServerTransport`` is an MCP ``Transport`` (what ``mcp.Client`` takes) that
also starts the server's process and tells the bridge when the session ends:
``closed`` is set when the server's stdout reaches its end (stdio) or its
process exits (HTTP). ``abort()`` kills the server's process group, which
ends a session that hangs (a server that never answers its first request).
Cancellation notifications the client sends are logged, so an operator can
see a cancelled call reach the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import anyio
import mcp_types as types
from anyio.abc import Process
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage

from sidecars.mcp._process import (
    OutputPipe,
    child_pids,
    kill_group,
    server_argv,
    server_environment,
)
from sidecars.mcp._spec import ServerSpec

log = logging.getLogger("sidecars.mcp")

Streams = tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]
#: How often to try the HTTP server's port while it starts.
_PORT_POLL = 0.1


class ServerTransport:
    """Starts the server and connects to it; a single-use async context manager."""

    def __init__(self, spec: ServerSpec) -> None:
        self._spec = spec
        self._stack = AsyncExitStack()
        self._output = OutputPipe()
        #: Set when the session's connection ended (the server exited or closed its output).
        self.closed = asyncio.Event()
        #: The server's process group (its pid): what ``abort`` and closing kill.
        self.pgid: int | None = None

    def abort(self) -> None:
        """Kills the server's process group: the session ends as if the server had died."""
        if self.pgid is not None:
            kill_group(self.pgid)
        self.closed.set()

    async def __aenter__(self) -> Streams:
        env = server_environment(self._spec)
        argv = server_argv(self._spec, env)
        try:
            if self._spec.transport == "stdio":
                streams = await self._stdio(argv, env)
            else:
                streams = await self._http(argv, env)
        except BaseException:
            await self._close()
            raise
        read, write = streams
        return _ReadStream(read, self.closed.set), _WriteStream(write)

    async def __aexit__(self, *_: object) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            # The SDK's shutdown (close stdin, wait, kill the group) shields itself; a scope
            # of ours around it would break anyio's nesting of the transport's task group.
            await self._stack.aclose()
        finally:
            if self.pgid is not None:
                kill_group(self.pgid)  # whatever the server started and left behind
            self.closed.set()
            await self._output.close()

    async def _stdio(self, argv: list[str], env: dict[str, str]) -> Streams:
        before = child_pids()
        params = StdioServerParameters(command=argv[0], args=argv[1:], env=env, cwd=os.getcwd())
        streams = await self._stack.enter_async_context(
            stdio_client(params, errlog=self._output.writer)
        )
        self._output.start()
        # The SDK spawned the server as the leader of a new session (pgid = pid).
        spawned = child_pids() - before
        self.pgid = next(iter(spawned)) if len(spawned) == 1 else None
        log.info("MCP server started (pid %s): %s", self.pgid or "?", self._spec.display)
        return streams

    async def _http(self, argv: list[str], env: dict[str, str]) -> Streams:
        process = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=self._output.writer,
            stderr=self._output.writer, env=env, cwd=os.getcwd(), start_new_session=True,
        )  # fmt: skip
        self.pgid = process.pid
        self._output.start()
        self._stack.callback(kill_group, process.pid)
        watcher = asyncio.create_task(self._watch_exit(process))
        self._stack.callback(watcher.cancel)
        log.info("MCP server started (pid %d): %s at %s", process.pid, self._spec.display,
                 self._spec.url)  # fmt: skip
        await self._wait_for_port(process)
        return await self._stack.enter_async_context(streamable_http_client(self._spec.url))

    async def _watch_exit(self, process: Process) -> None:
        await process.wait()
        log.warning("the MCP server exited with status %s", process.returncode)
        self.closed.set()

    async def _wait_for_port(self, process: Process) -> None:
        """Waits until the HTTP server accepts connections (the caller bounds the wait)."""
        where = urlsplit(self._spec.url)
        host = where.hostname or "127.0.0.1"
        port = where.port or (443 if where.scheme == "https" else 80)
        while True:
            if process.returncode is not None:
                raise ConnectionError(
                    f"the MCP server exited (status {process.returncode}) before it listened "
                    f"on {self._spec.url}"
                )
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(_PORT_POLL)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


class _ReadStream:
    """The session's read stream; calls ``on_end`` when the server's output ends."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_end: Any) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        """The sender's context, where the inner stream keeps one (the dispatcher reads it)."""
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    def __aiter__(self) -> _ReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _ReadStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        return None


class _WriteStream:
    """The session's write stream; logs each cancellation the client sends the server."""

    def __init__(self, inner: WriteStream[SessionMessage]) -> None:
        self._inner = inner

    async def send(self, item: SessionMessage, /) -> None:
        message = item.message
        if isinstance(message, types.JSONRPCNotification) and (
            message.method == "notifications/cancelled"
        ):
            params = message.params or {}
            log.info(
                "sent MCP cancellation of request %s (%s)",
                params.get("requestId"),
                params.get("reason") or "no reason",
            )
        await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WriteStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        return None
