"""The event loop Sidemesh's processes run on: uvloop, unless told otherwise.

Measured on the orchestrator's forwarding path (``make bench``; bench/README.md):
uvloop cuts the CPU of a forwarded call by 12 to 26 % and of a streamed message
by 7 to 37 %. ``SIDEMESH_EVENT_LOOP=asyncio`` selects the standard loop (for
debugging, or where uvloop is missing).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Set to ``asyncio`` to run on the standard event loop instead of uvloop.
EVENT_LOOP_ENV = "SIDEMESH_EVENT_LOOP"


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` to completion on a new event loop (uvloop when available)."""
    if os.environ.get(EVENT_LOOP_ENV, "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
