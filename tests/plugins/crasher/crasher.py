"""Fails the way a misconfigured plugin does: a message on stderr and a non-zero exit."""

import sys

print("fatal: cannot open database at /var/lib/crasher.db", file=sys.stderr, flush=True)
sys.exit(3)
