"""Writes to stderr, then hangs without ever serving."""

import sys
import time

print("loading a very large model from /models/huge.bin ...", file=sys.stderr, flush=True)
time.sleep(3600)
