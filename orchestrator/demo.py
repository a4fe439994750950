"""``make run``: the demo session (under construction)."""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main())
