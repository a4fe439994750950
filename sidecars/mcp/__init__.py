"""The MCP bridge sidecar: ``python -m sidecars.mcp``.

It turns an existing MCP server into a mesh plugin. The orchestrator starts
it, for a manifest with ``runtime: mcp``, with the usual sidecar environment
plus ``$SIDEMESH_MCP_SERVER`` (the manifest's ``mcp:`` section as JSON). The
bridge starts the MCP server as its child (stdio, or a local streamable HTTP
server), connects with the official MCP SDK (``mcp``) in its automatic mode,
so servers of the 2025 handshake era and of the 2026 stateless era both work,
and serves on ``$SIDEMESH_LISTEN``:

- ``PluginService`` (the server's identity, version and tools) and health;
- ``ToolService``: every MCP tool as ``plugin/tool``, arguments checked
  against its input schema, progress streamed, ``isError`` as ``is_error``;
- ``McpService``: tools, resources, templates, prompts, completion, and the
  server's notifications (``Watch``).

The server is restarted when it exits, never outlives the bridge, and its
stderr becomes the plugin's log lines. A server that does not answer its
first request within the startup timeout makes the sidecar exit with status
3 and a message that becomes the plugin's error.
"""

from sidecars.mcp._main import main

__all__ = ["main"]
