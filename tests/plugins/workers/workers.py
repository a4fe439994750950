"""Test plugin: observable cancellation, long streams, and callbacks through the mesh."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from plugins_sdk import AgentContext, AgentInput, Plugin, ToolContext

app = Plugin()  # named by its plugin.yaml


def _mark(name: str) -> None:
    """Leaves a file in the plugin's data dir, where the test can see it."""
    Path(os.environ["SIDEMESH_DATA_DIR"], name).write_text(str(os.getpid()))


@app.tool(read_only=True)
async def echo(text: str) -> str:
    """Returns its input."""
    return text


@app.tool(read_only=True)
async def whoami() -> int:
    """The replica that served the call."""
    return int(os.environ["SIDEMESH_REPLICA"])


@app.tool()
async def sleepy(seconds: float, tag: str, ctx: ToolContext) -> str:
    """Sleeps; records 'cancelled-<tag>' in the data dir if it is cancelled."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(f"cancelled-{tag}")
        raise
    return f"slept {seconds}s"


@app.agent(capabilities=["ticks"])
async def ticker(input: AgentInput, ctx: AgentContext) -> AsyncIterator[str]:
    """Streams `count` ticks `delay` seconds apart; records cancellation."""
    count = int(input.data.get("count", 5))
    delay = float(input.data.get("delay", 0.05))
    tag = str(input.data.get("tag", "ticker"))
    try:
        for i in range(count):
            yield f"tick {i} "
            await asyncio.sleep(delay)
    except asyncio.CancelledError:
        _mark(f"cancelled-{tag}")
        raise


@app.agent()
async def delegator(input: AgentInput, ctx: AgentContext) -> AsyncIterator[str]:
    """Calls the tool named in the input through the mesh and streams its text."""
    tool = str(input.data.get("tool", "workers/echo"))
    args = dict(input.data.get("arguments", {"text": input.text}))
    result = await ctx.call_tool(tool, args)
    yield result.text
