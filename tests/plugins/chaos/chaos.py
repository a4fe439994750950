"""Test plugin for the chaos tests: idempotent and non-idempotent tools, a streaming agent.

Every answer names the replica that gave it, so a test knows which calls were
in flight on the replica it killed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from plugins_sdk import AgentContext, Plugin

app = Plugin()  # named by its plugin.yaml
REPLICA = int(os.environ.get("SIDEMESH_REPLICA", "0"))


class StreamInput(BaseModel):
    """``count`` deltas of ``size`` bytes, ``delay`` seconds apart."""

    count: int = Field(10, ge=0, le=100_000)
    size: int = Field(16, ge=1, le=1 << 20)
    delay: float = Field(0.0, ge=0, le=10)


@app.tool(read_only=True, idempotent=True)
async def echo(text: str) -> dict[str, object]:
    """Returns its input and the replica that served it (idempotent: retried when safe)."""
    return {"text": text, "replica": REPLICA}


@app.tool(read_only=True)
async def whoami() -> int:
    """The replica that served the call."""
    return REPLICA


@app.tool()
async def note(text: str) -> int:
    """Not idempotent: the mesh may not retry it once it reached a replica."""
    await asyncio.sleep(0.01)
    return REPLICA


@app.agent()
async def stream(input: StreamInput, ctx: AgentContext) -> AsyncIterator[str]:
    """The replica index first (``r<N>:``), then ``count`` deltas."""
    yield f"r{REPLICA}:"
    text = "x" * input.size
    for _ in range(input.count):
        yield text
        await asyncio.sleep(input.delay)
