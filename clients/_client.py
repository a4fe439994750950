"""``AsyncMeshClient``: calls the mesh's agents, tools and catalog with ``grpc.aio``."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Self

import grpc

from clients._agent_input import agent_input
from clients._chat import ChatSession
from clients._credentials import Credentials, TlsOptions, resolve_credentials
from clients._mcp import McpMethods
from clients._results import ToolCallResult
from clients._streams import AgentStream, ServerStream, ToolCallStream, unary
from clients._tracing import tracing_interceptors
from sidemesh.core import (
    DEFAULT_TCP_ADDRESS,
    FailedPreconditionError,
    InternalError,
    UnavailableError,
    normalize_address,
    to_struct,
)
from sidemesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    mcp_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    tool_pb2,
    tool_pb2_grpc,
)

#: Environment variable naming the mesh's address when none is given.
ADDRESS_ENV = "SIDEMESH_ADDRESS"
#: Default limit on a message's size, each way.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

Metadata = Sequence[tuple[str, str]]
ProgressCallback = Callable[[common_pb2.Progress], Awaitable[None] | None]
LogCallback = Callable[[common_pb2.LogRecord], Awaitable[None] | None]


class _Stubs:
    """The service stubs of one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.agents = agent_pb2_grpc.AgentServiceStub(channel)
        self.tools = tool_pb2_grpc.ToolServiceStub(channel)
        self.mesh = mesh_pb2_grpc.MeshServiceStub(channel)
        self.mcp = mcp_pb2_grpc.McpServiceStub(channel)


class AsyncMeshClient(McpMethods):
    """A connection to the mesh (the orchestrator, or a sidecar's callback socket).

    ``address`` is ``host:port`` or ``unix:/path``; by default ``$SIDEMESH_ADDRESS``,
    else ``DEFAULT_TCP_ADDRESS``. ``token`` or ``token_file`` is a bearer token to
    send, and ``tls`` a :class:`TlsOptions` (CA, client certificate and key) for
    TLS; by default ``$SIDEMESH_TOKEN``, ``$SIDEMESH_TOKEN_FILE`` and
    ``$SIDEMESH_TLS_CA`` / ``_CERT`` / ``_KEY``, else, for the TCP address of a mesh
    running from ``state_dir`` (default: the mesh's default state dir), that mesh's
    owner token (see ``clients/_credentials.py``). ``timeout`` is the default deadline of each call
    in seconds (``None``: no deadline); ``metadata`` is sent on every call;
    ``interceptors`` wrap every call. With ``tracing`` (the default) every call
    is an OpenTelemetry CLIENT span that carries its W3C context to the server
    (``tracing_interceptors``, installed before ``interceptors``). The channel
    opens on first use, bound to the running event loop: use a client within
    one loop. ``close`` cancels the calls still running. The MCP servers of
    the mesh (resources, prompts, interactive tool calls) are
    :class:`~clients._mcp.McpMethods`.
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
        if address is None:
            address = os.environ.get(ADDRESS_ENV) or DEFAULT_TCP_ADDRESS
        self._address = normalize_address(address)
        self._timeout = timeout
        self._credentials = resolve_credentials(
            self._address, token=token, token_file=token_file, tls=tls, state_dir=state_dir
        )
        mine = tuple(metadata)
        sends_own = any(key == "authorization" for key, _ in mine)
        self._metadata = (() if sends_own else self._credentials.metadata()) + mine
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._interceptors = [
            *(tracing_interceptors(self._address) if tracing else ()),
            *interceptors,
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stubs_: _Stubs | None = None
        self._closed = False

    @property
    def address(self) -> str:
        """The mesh's address, normalized (``unix:/path`` or ``host:port``)."""
        return self._address

    @property
    def credentials(self) -> Credentials:
        """What the client sends to prove who it is (``credentials.describe()`` says it)."""
        return self._credentials

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call, in seconds."""
        return self._timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel, cancelling calls still running. Safe to call twice."""
        self._closed = True
        channel, self._channel, self._stubs_ = self._channel, None, None
        if channel is not None:
            await channel.close()

    def with_deadline(self, remaining: Callable[[], float | None]) -> AsyncMeshClient:
        """This client, whose calls default to a deadline of ``remaining()`` seconds.

        The view shares this client's channel, credentials and metadata (closing
        it closes nothing); ``remaining`` is asked at each call, ``None`` meaning
        no deadline. A plugin's ``ctx.mesh`` is one: callbacks made while handling
        a call never outlive it.
        """
        return _DeadlineView(self, remaining)

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        """Waits until the mesh accepts connections; ``UnavailableError`` after ``timeout``."""
        channel = self._connect()[0]
        try:
            async with asyncio.timeout(timeout):
                await channel.channel_ready()
        except TimeoutError:
            raise UnavailableError(
                f"the mesh at {self._address} did not accept a connection within {timeout} s"
            ) from None

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
    ) -> AgentStream:
        """Starts one agent turn and returns its event stream.

        ``input`` is text (``AgentInput.text``), a mapping (``AgentInput.data``)
        or an ``AgentInput``. Name the agent, or leave it empty and give a
        ``capability``.
        """
        request = agent_pb2.InvokeRequest(
            agent=agent,
            capability=capability,
            input=agent_input(input),
            session_id=session_id,
            options=to_struct(options) if options else None,
        )
        call = self._stubs().agents.Invoke(
            request, timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return AgentStream(call, _describe_agent(agent, capability))

    def chat(
        self,
        agent: str = "",
        *,
        capability: str = "",
        session_id: str = "",
        options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ChatSession:
        """Opens a conversation with an agent (``AgentService.Chat``).

        ``timeout`` bounds the whole conversation, not one turn. Use the
        session within one task at a time, or one sender and one reader.
        """
        start = agent_pb2.ChatStart(
            agent=agent,
            capability=capability,
            session_id=session_id,
            options=to_struct(options) if options else None,
        )
        call = self._stubs().agents.Chat(
            timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return ChatSession(call, start, _describe_agent(agent, capability))

    # -- tools ----------------------------------------------------------------

    async def call_tool(
        self,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        metadata: Metadata = (),
        **kwargs: Any,
    ) -> ToolCallResult:
        """Calls a tool and returns its result.

        The arguments are ``arguments`` merged with ``kwargs`` (``kwargs`` win).
        ``on_progress`` and ``on_log`` (plain or async functions) see the
        tool's progress and log events as they arrive. A tool that fails at
        its task returns a result with ``is_error``; it does not raise.
        """
        stream = self.call_tool_stream(
            tool, arguments, timeout=timeout, metadata=metadata, **kwargs
        )
        async for event in stream:
            kind = event.WhichOneof("event")
            if kind == "progress" and on_progress is not None:
                await _maybe_await(on_progress(event.progress))
            elif kind == "log" and on_log is not None:
                await _maybe_await(on_log(event.log))
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
    ) -> ToolCallStream:
        """Calls a tool and returns its event stream: progress and logs, then the result."""
        request = tool_pb2.CallToolRequest(
            tool=tool, arguments=to_struct({**(arguments or {}), **kwargs})
        )
        call = self._stubs().tools.CallTool(
            request, timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return ToolCallStream(call, f"tool {tool!r}")

    # -- the catalog (MeshService) ---------------------------------------------

    async def list_tools(
        self,
        plugin: str = "",
        query: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[tool_pb2.ToolDescriptor]:
        """The tools the mesh knows, optionally of one plugin or matching ``query``."""
        request = mesh_pb2.MeshServiceListToolsRequest(plugin=plugin, query=query)
        call = self._stubs().mesh.ListTools(
            request, timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return list((await unary(call, "ListTools")).tools)

    async def get_tool(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> tool_pb2.ToolDescriptor:
        """One tool's descriptor, by qualified or unique short name."""
        call = self._stubs().mesh.GetTool(
            mesh_pb2.GetToolRequest(name=name),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return (await unary(call, "GetTool")).tool

    async def list_agents(
        self,
        plugin: str = "",
        capability: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[agent_pb2.AgentDescriptor]:
        """The agents the mesh knows, optionally of one plugin or with a capability."""
        request = mesh_pb2.ListAgentsRequest(plugin=plugin, capability=capability)
        call = self._stubs().mesh.ListAgents(
            request, timeout=self._deadline(timeout), metadata=self._with(metadata)
        )
        return list((await unary(call, "ListAgents")).agents)

    async def get_agent(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> agent_pb2.AgentDescriptor:
        """One agent's descriptor, by qualified or unique short name."""
        call = self._stubs().mesh.GetAgent(
            mesh_pb2.GetAgentRequest(name=name),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return (await unary(call, "GetAgent")).agent

    async def list_plugins(
        self, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mesh_pb2.PluginStatus]:
        """Every plugin the mesh knows, with its state, replicas and health."""
        call = self._stubs().mesh.ListPlugins(
            mesh_pb2.ListPluginsRequest(),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return list((await unary(call, "ListPlugins")).plugins)

    async def get_plugin(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> mesh_pb2.PluginStatus:
        """One plugin's status."""
        call = self._stubs().mesh.GetPlugin(
            mesh_pb2.GetPluginRequest(name=name),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return (await unary(call, "GetPlugin")).plugin

    async def list_traces(
        self,
        *,
        limit: int = 0,
        plugin: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[mesh_pb2.TraceSummary]:
        """The most recent traces the mesh keeps, newest first (``limit`` 0: the mesh's default)."""
        call = self._stubs().mesh.ListTraces(
            mesh_pb2.ListTracesRequest(limit=limit, plugin=plugin),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return list((await unary(call, "ListTraces")).traces)

    async def get_trace(
        self, trace_id: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[mesh_pb2.TraceSpan]:
        """One trace's spans from every process it crossed, by id or a unique prefix (6+)."""
        call = self._stubs().mesh.GetTrace(
            mesh_pb2.GetTraceRequest(trace_id=trace_id),
            timeout=self._deadline(timeout),
            metadata=self._with(metadata),
        )
        return list((await unary(call, "GetTrace")).spans)

    def watch_events(
        self,
        *,
        plugin: str = "",
        lifecycle_only: bool = False,
        replay: int = 0,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ServerStream[mesh_pb2.WatchEventsResponse]:
        """Streams the mesh's events live, after up to ``replay`` recent ones.

        The stream is open-ended, so the client's default timeout does not
        apply to it; pass ``timeout`` to bound it.
        """
        request = mesh_pb2.WatchEventsRequest(
            plugin=plugin, lifecycle_only=lifecycle_only, replay=replay
        )
        call = self._stubs().mesh.WatchEvents(
            request, timeout=timeout, metadata=self._with(metadata)
        )
        return ServerStream(call, "WatchEvents")

    # -- internals ------------------------------------------------------------

    def _connect(self) -> tuple[grpc.aio.Channel, _Stubs]:
        if self._closed:
            raise FailedPreconditionError(f"the client of {self._address} is closed")
        if self._channel is None or self._stubs_ is None:
            self._channel = self._credentials.channel(
                self._address, self._options, self._interceptors or None
            )
            self._stubs_ = _Stubs(self._channel)
        return self._channel, self._stubs_

    def _stubs(self) -> _Stubs:
        return self._connect()[1]

    def _mcp_stub(self) -> mcp_pb2_grpc.McpServiceAsyncStub:
        return self._stubs().mcp

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _with(self, metadata: Metadata) -> tuple[tuple[str, str], ...]:
        return self._metadata + tuple(metadata)


class _DeadlineView(AsyncMeshClient):
    """``AsyncMeshClient.with_deadline``: the owner's client with a default deadline."""

    def __init__(self, owner: AsyncMeshClient, remaining: Callable[[], float | None]) -> None:
        # Not AsyncMeshClient.__init__: the owner's credentials, options and channel are it.
        self.__dict__.update(owner.__dict__)
        self._owner = owner
        self._remaining = remaining

    @property
    def timeout(self) -> float | None:
        """The default deadline now: what is left of the call this view serves."""
        return self._remaining()

    async def close(self) -> None:
        """Nothing to close: the channel is the owner's."""

    def _connect(self) -> tuple[grpc.aio.Channel, _Stubs]:
        return self._owner._connect()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._remaining() if timeout is None else timeout


def _describe_agent(agent: str, capability: str) -> str:
    if agent:
        return f"agent {agent!r}"
    return f"the agent with capability {capability!r}"


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value
