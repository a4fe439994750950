"""The mesh as an MCP gateway: one MCP server made of the mesh (or a virtual server of it),
on stdio (``sidemesh mcp``) and streamable HTTP (``sidemesh serve``, with MCP authorization)."""

from orchestrator.gateway._auth import (
    ANONYMOUS,
    AllowAll,
    Anonymous,
    Authenticator,
    Authorizer,
    JwtAuthenticator,
    Unauthenticated,
)
from orchestrator.gateway._http import McpHttpEndpoint
from orchestrator.gateway._server import MeshMcpServer
from orchestrator.gateway._stdio import stdio_streams
from orchestrator.gateway._view import View, mcp_name

__all__ = [
    "ANONYMOUS",
    "AllowAll",
    "Anonymous",
    "Authenticator",
    "Authorizer",
    "JwtAuthenticator",
    "McpHttpEndpoint",
    "MeshMcpServer",
    "Unauthenticated",
    "View",
    "mcp_name",
    "stdio_streams",
]
