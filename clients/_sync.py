"""``MeshClient``: the blocking client, ``AsyncMeshClient`` driven on a private loop.

Each ``MeshClient`` owns a daemon thread running an event loop; every call
runs there and the caller blocks on its result. ``close`` (or leaving the
``with`` block, or the client being garbage-collected) cancels calls still
running and stops the thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from clients._client import DEFAULT_MAX_MESSAGE_BYTES, AsyncMeshClient, Metadata
from clients._credentials import Credentials, TlsOptions
from clients._loop import LoopThread
from clients._results import ToolCallResult
from clients._sync_streams import SyncAgentStream, SyncChatSession, SyncStream, SyncToolCallStream
from sidemesh.core import InternalError
from sidemesh.v1 import agent_pb2, common_pb2, mcp_pb2, mesh_pb2, tool_pb2


class MeshClient:
    """A blocking connection to the mesh, with the same API as ``AsyncMeshClient``.

    Iterators are plain iterators; ``on_progress`` and ``on_log`` callbacks
    run in the calling thread. One client may be shared by several threads.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        tracing: bool = True,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: TlsOptions | bool | None = None,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._async = AsyncMeshClient(
            address,
            timeout=timeout,
            metadata=metadata,
            max_message_bytes=max_message_bytes,
            interceptors=interceptors,
            tracing=tracing,
            token=token,
            token_file=token_file,
            tls=tls,
            state_dir=state_dir,
        )
        self._loop = LoopThread(f"sidemesh-client {self._async.address}")
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._async)

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancels calls still running, closes the channel and stops the client's thread."""
        self._finalizer()

    def wait_for_ready(self, timeout: float | None = None) -> None:
        """Waits until the mesh accepts connections; ``UnavailableError`` after ``timeout``."""
        self._loop.run(self._async.wait_for_ready(timeout))

    # -- agents ---------------------------------------------------------------

    def invoke(
        self,
        agent: str = "",
        input: str | Mapping[str, Any] | agent_pb2.AgentInput = "",
        *,
        capability: str = "",
        session_id: str = "",
        options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> SyncAgentStream:
        """Starts one agent turn and returns its event stream; see ``AsyncMeshClient.invoke``."""
        stream = self._loop.call(
            self._async.invoke,
            agent,
            input,
            capability=capability,
            session_id=session_id,
            options=options,
            timeout=timeout,
            metadata=metadata,
        )
        return SyncAgentStream(stream, self._loop)

    def chat(
        self,
        agent: str = "",
        *,
        capability: str = "",
        session_id: str = "",
        options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> SyncChatSession:
        """Opens a conversation with an agent; see ``AsyncMeshClient.chat``."""
        session = self._loop.call(
            self._async.chat,
            agent,
            capability=capability,
            session_id=session_id,
            options=options,
            timeout=timeout,
            metadata=metadata,
        )
        return SyncChatSession(session, self._loop)

    # -- tools ----------------------------------------------------------------

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
        """Calls a tool and returns its result; see ``AsyncMeshClient.call_tool``."""
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

    def call_tool_stream(
        self,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **kwargs: Any,
    ) -> SyncToolCallStream:
        """Calls a tool and returns its event stream: progress and logs, then the result."""
        stream = self._loop.call(
            self._async.call_tool_stream,
            tool,
            arguments,
            timeout=timeout,
            metadata=metadata,
            **kwargs,
        )
        return SyncToolCallStream(stream, self._loop)

    # -- the catalog (MeshService) ---------------------------------------------

    def list_tools(
        self,
        plugin: str = "",
        query: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[tool_pb2.ToolDescriptor]:
        """The tools the mesh knows, optionally of one plugin or matching ``query``."""
        return self._loop.run(
            self._async.list_tools(plugin, query, timeout=timeout, metadata=metadata)
        )

    def get_tool(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> tool_pb2.ToolDescriptor:
        """One tool's descriptor, by qualified or unique short name."""
        return self._loop.run(self._async.get_tool(name, timeout=timeout, metadata=metadata))

    def list_agents(
        self,
        plugin: str = "",
        capability: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[agent_pb2.AgentDescriptor]:
        """The agents the mesh knows, optionally of one plugin or with a capability."""
        return self._loop.run(
            self._async.list_agents(plugin, capability, timeout=timeout, metadata=metadata)
        )

    def get_agent(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> agent_pb2.AgentDescriptor:
        """One agent's descriptor, by qualified or unique short name."""
        return self._loop.run(self._async.get_agent(name, timeout=timeout, metadata=metadata))

    def list_plugins(
        self, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mesh_pb2.PluginStatus]:
        """Every plugin the mesh knows, with its state, replicas and health."""
        return self._loop.run(self._async.list_plugins(timeout=timeout, metadata=metadata))

    def get_plugin(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> mesh_pb2.PluginStatus:
        """One plugin's status."""
        return self._loop.run(self._async.get_plugin(name, timeout=timeout, metadata=metadata))

    def list_traces(
        self,
        *,
        limit: int = 0,
        plugin: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[mesh_pb2.TraceSummary]:
        """The most recent traces the mesh keeps; see ``AsyncMeshClient.list_traces``."""
        return self._loop.run(
            self._async.list_traces(limit=limit, plugin=plugin, timeout=timeout, metadata=metadata)
        )

    def get_trace(
        self, trace_id: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mesh_pb2.TraceSpan]:
        """One trace's spans; see ``AsyncMeshClient.get_trace``."""
        return self._loop.run(self._async.get_trace(trace_id, timeout=timeout, metadata=metadata))

    # -- MCP servers (McpService) ----------------------------------------------

    def list_mcp_servers(self, *, timeout: float | None = None) -> list[str]:
        """The names of the mesh's MCP plugins."""
        return self._loop.run(self._async.list_mcp_servers(timeout=timeout))

    def mcp_server_info(
        self, server: str, *, timeout: float | None = None
    ) -> mcp_pb2.McpServerInfo:
        """An MCP server's identity, protocol version and capabilities."""
        return self._loop.run(self._async.mcp_server_info(server, timeout=timeout))

    def list_resources(
        self, server: str, *, timeout: float | None = None
    ) -> list[mcp_pb2.Resource]:
        """Every resource of ``server``."""
        return self._loop.run(self._async.list_resources(server, timeout=timeout))

    def list_resource_templates(
        self, server: str, *, timeout: float | None = None
    ) -> list[mcp_pb2.ResourceTemplate]:
        """Every resource template of ``server``."""
        return self._loop.run(self._async.list_resource_templates(server, timeout=timeout))

    def read_resource(
        self, server: str, uri: str, *, timeout: float | None = None
    ) -> list[common_pb2.ResourceContents]:
        """A resource's contents; ``NotFoundError`` for an unknown URI."""
        return self._loop.run(self._async.read_resource(server, uri, timeout=timeout))

    def list_prompts(self, server: str, *, timeout: float | None = None) -> list[mcp_pb2.Prompt]:
        """Every prompt of ``server``."""
        return self._loop.run(self._async.list_prompts(server, timeout=timeout))

    def get_prompt(
        self,
        server: str,
        name: str,
        arguments: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> mcp_pb2.GetPromptResponse:
        """A prompt rendered with ``arguments``."""
        return self._loop.run(self._async.get_prompt(server, name, arguments, timeout=timeout))

    def complete(self, server: str, argument: str, value: str = "", **kwargs: Any) -> Any:
        """Completions of a prompt argument or a template variable; see ``AsyncMeshClient``."""
        return self._loop.run(self._async.complete(server, argument, value, **kwargs))

    def watch_events(
        self,
        *,
        plugin: str = "",
        lifecycle_only: bool = False,
        replay: int = 0,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> SyncStream[mesh_pb2.WatchEventsResponse]:
        """Streams the mesh's events live; see ``AsyncMeshClient.watch_events``."""
        stream = self._loop.call(
            self._async.watch_events,
            plugin=plugin,
            lifecycle_only=lifecycle_only,
            replay=replay,
            timeout=timeout,
            metadata=metadata,
        )
        return SyncStream(stream, self._loop)


def _shutdown(loop: LoopThread, client: AsyncMeshClient) -> None:
    """Closes ``client`` on ``loop``, then stops the loop (a finalizer: no reference to self)."""
    try:
        if not loop.stopped and threading.current_thread() is not loop.thread:
            loop.run(client.close())
    finally:
        loop.stop()
