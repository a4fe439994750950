"""``ctx.mesh``: the plugin's mesh client as seen from one call.

Callbacks made while handling a call inherit its remaining deadline, so a
callback never outlives the call that needs it. They join the call's trace
without help from here: the call's span is current in the handler's task, and
the client's tracing interceptors start each callback's span under it and
inject its W3C context. The plugin shares one ``AsyncMeshClient`` (one
channel) across calls; this view only fills in the per-call deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from clients import AgentStream, AsyncMeshClient, ChatSession, ToolCallResult, ToolCallStream
from sidemesh.v1 import agent_pb2, tool_pb2

Metadata = Sequence[tuple[str, str]]


class CallMesh:
    """The mesh, for callbacks made during one call (the ``AsyncMeshClient`` API).

    Each method takes the same arguments as the ``AsyncMeshClient`` method of
    the same name; ``timeout`` defaults to the call's remaining deadline.
    """

    def __init__(self, client: AsyncMeshClient, time_remaining: Callable[[], float | None]) -> None:
        self._client = client
        self._time_remaining = time_remaining

    @property
    def client(self) -> AsyncMeshClient:
        """The plugin's shared client, without the per-call defaults."""
        return self._client

    def _timeout(self, timeout: float | None) -> float | None:
        return self._time_remaining() if timeout is None else timeout

    async def call_tool(
        self,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **kwargs: Any,
    ) -> ToolCallResult:
        """Calls a tool through the mesh and returns its result."""
        return await self._client.call_tool(
            tool,
            arguments,
            timeout=self._timeout(timeout),
            metadata=metadata,
            **kwargs,
        )

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
        """Calls a tool and returns its event stream (progress, logs, then the result)."""
        return self._client.call_tool_stream(
            tool,
            arguments,
            timeout=self._timeout(timeout),
            metadata=metadata,
            **kwargs,
        )

    def invoke(
        self,
        agent: str = "",
        input: str | Mapping[str, Any] | agent_pb2.AgentInput = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **kwargs: Any,
    ) -> AgentStream:
        """Starts one turn of another agent and returns its event stream."""
        return self._client.invoke(
            agent,
            input,
            timeout=self._timeout(timeout),
            metadata=metadata,
            **kwargs,
        )

    def chat(
        self,
        agent: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **kwargs: Any,
    ) -> ChatSession:
        """Opens a conversation with another agent."""
        return self._client.chat(agent, timeout=self._timeout(timeout), metadata=metadata, **kwargs)

    async def list_tools(
        self,
        plugin: str = "",
        query: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[tool_pb2.ToolDescriptor]:
        """The tools in the mesh, optionally of one plugin or matching ``query``."""
        return await self._client.list_tools(
            plugin, query, timeout=self._timeout(timeout), metadata=metadata
        )

    async def list_agents(
        self,
        plugin: str = "",
        capability: str = "",
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[agent_pb2.AgentDescriptor]:
        """The agents in the mesh, optionally of one plugin or with a capability."""
        return await self._client.list_agents(
            plugin, capability, timeout=self._timeout(timeout), metadata=metadata
        )
