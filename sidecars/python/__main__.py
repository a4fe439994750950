"""Entry point of ``python -m sidecars.python MODULE:ATTR``."""

import sys

from sidecars.python._main import main

if __name__ == "__main__":
    sys.exit(main())
