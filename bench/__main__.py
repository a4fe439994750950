"""``python -m bench``: the benchmark (``make bench``); ``--smoke`` for a seconds-long check."""

import sys

from bench._cli import main

if __name__ == "__main__":
    sys.exit(main())
