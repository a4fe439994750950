"""tools-demo: typed example tools, each showing one thing a tool can do.

- ``add``: typed arguments and a structured number result.
- ``word_count``: a structured object result with an output schema.
- ``slow_count``: progress events while it works; honours cancellation.
- ``divide``: failing at its task with ``ToolError`` (an error *result*).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from pydantic import BaseModel, Field

from plugins_sdk import Plugin, ToolContext, ToolError

app = Plugin()  # its name, version and description are in plugin.yaml


class Counts(BaseModel):
    """What ``word_count`` finds in a text."""

    words: int = Field(description="whitespace-separated words")
    characters: int = Field(description="characters, including whitespace")
    lines: int = Field(description="lines; 0 for an empty text")


@app.tool(read_only=True, idempotent=True)
async def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@app.tool(read_only=True, idempotent=True)
async def word_count(text: str) -> Counts:
    """Counts the words, characters and lines of a text."""
    lines = text.count("\n") + 1 if text else 0
    return Counts(words=len(text.split()), characters=len(text), lines=lines)


@app.tool(read_only=True)
async def slow_count(
    ctx: ToolContext,
    n: Annotated[int, Field(ge=0, le=1000, description="how far to count")] = 5,
    delay: Annotated[float, Field(ge=0, le=10, description="seconds per step")] = 0.2,
) -> str:
    """Counts to n slowly, reporting progress at each step."""
    for i in range(1, n + 1):
        await asyncio.sleep(delay)
        await ctx.report_progress(i, n, f"counted {i} of {n}")
    return f"counted to {n}"


@app.tool(read_only=True, idempotent=True)
async def divide(a: float, b: float) -> float:
    """Divides a by b."""
    if b == 0:
        raise ToolError(f"cannot divide {a} by zero")
    return a / b
