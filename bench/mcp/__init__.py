"""The MCP benchmark (``python -m bench.mcp``): Sidemesh's MCP endpoints against FastMCP's proxy,
mcp-proxy and the bare server, one FastMCP echo server behind each."""
