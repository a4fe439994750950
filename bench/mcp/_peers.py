"""mcp-proxy, a peer of the MCP benchmark, in a virtualenv of its own.

mcp-proxy 0.13 requires ``mcp<2``; Sidemesh uses ``mcp>=2.3``. Both cannot
live in ``.venv``, so the benchmark creates ``.venv-mcp-proxy`` beside it
(once, with pip from PyPI) and runs mcp-proxy from there. FastMCP 4 works
with mcp 2.3 and is in the ``bench`` extra instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The mcp-proxy release the benchmark measures.
MCP_PROXY_VERSION = "0.13.0"
VENV = Path(__file__).resolve().parent.parent.parent / ".venv-mcp-proxy"


def mcp_proxy_command() -> list[str]:
    """The mcp-proxy command, installing it into its virtualenv first if need be."""
    binary = VENV / "bin" / "mcp-proxy"
    stamp = VENV / f".mcp-proxy-{MCP_PROXY_VERSION}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", f"mcp-proxy=={MCP_PROXY_VERSION}"],
            check=True, timeout=600,
        )  # fmt: skip
        stamp.touch()
    return [str(binary)]
