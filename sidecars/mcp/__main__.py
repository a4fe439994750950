"""Entry point of ``python -m sidecars.mcp``."""

import sys

from sidecars.mcp._main import main

if __name__ == "__main__":
    sys.exit(main())
