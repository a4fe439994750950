"""``MeshClient``: the blocking client, ``AsyncMeshClient`` driven on a private loop.

Each ``MeshClient`` owns a daemon thread running an event loop; every call
runs there and the caller blocks on its result. ``close`` (or leaving the
``with`` block, or the client being garbage-collected) cancels calls still
running and stops the thread.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from clients._client import AsyncMeshClient, Metadata
from clients._credentials import Credentials
from clients._loop import LoopThread
from clients._results import ToolCallResult
from clients._sync_streams import SyncAgentStream, SyncChatSession, SyncStream, SyncToolCallStream
from sidemesh.core import InternalError
from sidemesh.v1 import common_pb2

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")
W = TypeVar("W")


def _constructor(
    init: Callable[Concatenate[AsyncMeshClient, P], None],
) -> Callable[
    [Callable[[MeshClient, AsyncMeshClient], None]], Callable[Concatenate[MeshClient, P], None]
]:
    """``MeshClient.__init__`` with ``AsyncMeshClient.__init__``'s signature: the
    arguments make the async client, which the decorated function then adopts."""

    def derive(
        adopt: Callable[[MeshClient, AsyncMeshClient], None],
    ) -> Callable[Concatenate[MeshClient, P], None]:
        @functools.wraps(init)
        def __init__(self: MeshClient, /, *args: P.args, **kwargs: P.kwargs) -> None:
            client = AsyncMeshClient.__new__(AsyncMeshClient)
            init(client, *args, **kwargs)
            adopt(self, client)

        return __init__

    return derive


def _blocking(
    method: Callable[Concatenate[AsyncMeshClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[MeshClient, P], R]:
    """``AsyncMeshClient.<method>``, run on the client's loop while the caller waits."""

    @functools.wraps(method)
    def call(self: MeshClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(method(self._async, *args, **kwargs))

    return call


def _streaming(
    method: Callable[Concatenate[AsyncMeshClient, P], S],
    blocking: Callable[[S, LoopThread], W],
) -> Callable[Concatenate[MeshClient, P], W]:
    """``AsyncMeshClient.<method>`` (which opens a stream), its stream made blocking."""

    @functools.wraps(method)
    def call(self: MeshClient, /, *args: P.args, **kwargs: P.kwargs) -> W:
        return blocking(self._loop.call(method, self._async, *args, **kwargs), self._loop)

    return call


class MeshClient:
    """A blocking connection to the mesh, with the same API as ``AsyncMeshClient``.

    Its methods are ``AsyncMeshClient``'s, each made blocking (``_blocking``,
    ``_streaming``): the API is written once, in the async client.

    Iterators are plain iterators; ``on_progress`` and ``on_log`` callbacks
    run in the calling thread. One client may be shared by several threads.
    """

    @_constructor(AsyncMeshClient.__init__)
    def __init__(self, client: AsyncMeshClient) -> None:
        """Takes ``AsyncMeshClient``'s arguments; the async client they make runs on a
        private loop thread."""
        self._async = client
        self._loop = LoopThread(f"sidemesh-client {client.address}")
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, client)

    @property
    def address(self) -> str:
        """The mesh's address, normalized (``unix:/path`` or ``host:port``)."""
        return self._async.address

    @property
    def credentials(self) -> Credentials:
        """What the client sends to prove who it is; see ``AsyncMeshClient.credentials``."""
        return self._async.credentials

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call, in seconds."""
        return self._async.timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancels calls still running, closes the channel and stops the client's thread."""
        self._finalizer()

    def wait_for_ready(self, timeout: float | None = None) -> None:
        """Waits until the mesh accepts connections; ``UnavailableError`` after ``timeout``."""
        self._loop.run(self._async.wait_for_ready(timeout))

    # -- the API: AsyncMeshClient's, each method made blocking ---------------

    invoke = _streaming(AsyncMeshClient.invoke, SyncAgentStream)
    chat = _streaming(AsyncMeshClient.chat, SyncChatSession)
    call_tool_stream = _streaming(AsyncMeshClient.call_tool_stream, SyncToolCallStream)
    watch_events = _streaming(AsyncMeshClient.watch_events, SyncStream)

    list_tools = _blocking(AsyncMeshClient.list_tools)
    get_tool = _blocking(AsyncMeshClient.get_tool)
    list_agents = _blocking(AsyncMeshClient.list_agents)
    get_agent = _blocking(AsyncMeshClient.get_agent)
    list_plugins = _blocking(AsyncMeshClient.list_plugins)
    get_plugin = _blocking(AsyncMeshClient.get_plugin)
    list_traces = _blocking(AsyncMeshClient.list_traces)
    get_trace = _blocking(AsyncMeshClient.get_trace)

    list_mcp_servers = _blocking(AsyncMeshClient.list_mcp_servers)
    mcp_server_info = _blocking(AsyncMeshClient.mcp_server_info)
    list_resources = _blocking(AsyncMeshClient.list_resources)
    list_resource_templates = _blocking(AsyncMeshClient.list_resource_templates)
    read_resource = _blocking(AsyncMeshClient.read_resource)
    list_prompts = _blocking(AsyncMeshClient.list_prompts)
    get_prompt = _blocking(AsyncMeshClient.get_prompt)
    complete = _blocking(AsyncMeshClient.complete)

    def call_tool(
        self,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        on_progress: Callable[[common_pb2.Progress], object] | None = None,
        on_log: Callable[[common_pb2.LogRecord], object] | None = None,
        metadata: Metadata = (),
        **kwargs: Any,
    ) -> ToolCallResult:
        """Calls a tool and returns its result; see ``AsyncMeshClient.call_tool``.

        (Written out, not derived: ``on_progress`` and ``on_log`` run in the
        calling thread, from the blocking stream.)
        """
        stream = self.call_tool_stream(
            tool, arguments, timeout=timeout, metadata=metadata, **kwargs
        )
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "progress" and on_progress is not None:
                on_progress(event.progress)
            elif kind == "log" and on_log is not None:
                on_log(event.log)
        result = stream.result
        if result is None:  # pragma: no cover - the stream raises before this
            raise InternalError(f"{stream.description} ended without a result event")
        return result


def _shutdown(loop: LoopThread, client: AsyncMeshClient) -> None:
    """Closes ``client`` on ``loop``, then stops the loop (a finalizer: no reference to self)."""
    try:
        if not loop.stopped and threading.current_thread() is not loop.thread:
            loop.run(client.close())
    finally:
        loop.stop()
