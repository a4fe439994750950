"""Chaos runs: replicas killed under load, and what callers see (``python -m bench.chaos``).

Issue 10's acceptance figures come from here: with 3 replicas and one
SIGKILLed every 2 s, 2,000 idempotent unary calls and a stream load; then
replicas killed under load until at least 100 restarts, counting how every
replica exited (no SIGSEGV). The integration tests run the same scenarios,
smaller.
"""

from bench.chaos._mesh import CHAOS_PLUGIN, ChaosMesh
from bench.chaos._scenario import Report, run_kills, run_restarts

__all__ = ["CHAOS_PLUGIN", "ChaosMesh", "Report", "run_kills", "run_restarts"]
