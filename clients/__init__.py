"""Sidemesh clients: call the mesh's agents and tools from Python.

``AsyncMeshClient`` (``grpc.aio``) and ``MeshClient`` (blocking, the same API)
invoke agents, hold chats, call tools and read the mesh's catalog and events.

A client proves who it is with a bearer token or a TLS client certificate
(``token=``, ``token_file=``, ``tls=TlsOptions(...)``, or ``$SIDEMESH_TOKEN`` and
friends), or finds the token of the mesh running on this machine by itself.

Every call is an OpenTelemetry CLIENT span carrying its W3C trace context
(``tracing_interceptors``; ``tracing=False`` turns it off).

The error classes here are the mesh's one exception hierarchy, re-exported from
``sidemesh.core`` (where the rest of the shared vocabulary lives: names,
``Struct`` conversion, addresses): the SDK and the orchestrator raise the same
classes, each keeping its gRPC status code.
"""

from clients._chat import ChatSession
from clients._client import AsyncMeshClient
from clients._credentials import TlsOptions
from clients._mcp import McpRequestError, McpToolCall
from clients._results import AgentReply, ToolCallResult
from clients._streams import AgentStream, ServerStream, ToolCallStream
from clients._sync import MeshClient
from clients._sync_streams import SyncAgentStream, SyncChatSession, SyncStream, SyncToolCallStream
from clients._tracing import tracing_interceptors
from sidemesh.core import (
    AbortedError,
    AlreadyExistsError,
    CallCancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SidemeshError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)

__all__ = [
    "AbortedError",
    "AgentReply",
    "AgentStream",
    "AlreadyExistsError",
    "AsyncMeshClient",
    "CallCancelledError",
    "ChatSession",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "McpRequestError",
    "McpToolCall",
    "MeshClient",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerStream",
    "SidemeshError",
    "SyncAgentStream",
    "SyncChatSession",
    "SyncStream",
    "SyncToolCallStream",
    "TlsOptions",
    "ToolCallResult",
    "ToolCallStream",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "tracing_interceptors",
]
