"""``python -m bench.mcp``: the MCP benchmark; ``--smoke`` for a seconds-long check."""

import sys

from bench.mcp._cli import main

if __name__ == "__main__":
    sys.exit(main())
