"""The ``sidemesh`` command line (under construction)."""

import sys


def main() -> int:
    print("sidemesh: the orchestrator is not built yet", file=sys.stderr)
    return 1
