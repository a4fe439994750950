"""bench: the plugin ``python -m bench`` measures every topology against.

- ``echo(payload)`` returns its argument: one ``CallTool`` that streams one
  result, the "unary tool call".
- the agent ``stream`` yields ``count`` text deltas of ``size`` bytes each,
  ``delay`` seconds apart (0: as fast as the stream takes them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from plugins_sdk import AgentContext, Plugin

app = Plugin("bench", version="0.1.0", description="Benchmark plugin: echo and a stream agent")

#: Bounds that keep a mistyped request from tying the sidecar up for long.
MAX_COUNT = 10_000_000
MAX_SIZE = 1024 * 1024


class StreamInput(BaseModel):
    """What the ``stream`` agent produces (``InvokeRequest.input.data``)."""

    count: int = Field(1, ge=0, le=MAX_COUNT, description="text deltas to yield")
    size: int = Field(64, ge=0, le=MAX_SIZE, description="bytes of each delta")
    delay: float = Field(0.0, ge=0, le=60, description="seconds between deltas")


@app.tool(read_only=True, idempotent=True)
async def echo(payload: str) -> str:
    """Returns ``payload`` unchanged."""
    return payload


@app.agent()
async def stream(input: StreamInput, ctx: AgentContext) -> AsyncIterator[str]:
    """Yields ``count`` deltas of ``size`` bytes, ``delay`` seconds apart."""
    text = "x" * input.size
    for i in range(input.count):
        if i and input.delay:
            await asyncio.sleep(input.delay)
        yield text
        if not input.delay:
            # Let the servicer send what is queued: without an await, the whole
            # stream would be produced before the first message leaves.
            await asyncio.sleep(0)
