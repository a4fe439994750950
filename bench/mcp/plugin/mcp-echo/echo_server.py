"""The MCP server behind every topology of the MCP benchmark: FastMCP, one ``echo`` tool, stdio."""

from fastmcp import FastMCP

server = FastMCP("echo")


@server.tool
def echo(text: str) -> str:
    """Returns ``text``."""
    return text


if __name__ == "__main__":
    server.run(transport="stdio", show_banner=False)
