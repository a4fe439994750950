"""assistant: an agent that streams its answer token by token and uses tools through the mesh.

- "what is 2 + 3?" calls ``tools-demo/add``;
- "count words in <text>" calls ``tools-demo/word_count`` and also yields the counts
  as structured output;
- anything else gets a short echo.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from plugins_sdk import AgentContext, AgentInput, Plugin

_SUM = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")
_COUNT = re.compile(r"count (?:the )?words in:?\s*(?P<text>.+)", re.IGNORECASE | re.DOTALL)
_TOKEN = re.compile(r"\S+\s*")


class Config(BaseModel):
    """The operator's config (``plugins.assistant.config``), declared only here."""

    token_delay: float = Field(0.02, ge=0, le=1, description="Seconds between streamed tokens")


app = Plugin(config_model=Config)  # its name, version and description are in plugin.yaml


@app.agent(capabilities=["chat", "math"])
async def assistant(input: AgentInput, ctx: AgentContext) -> AsyncIterator[str | dict[str, int]]:
    """Adds numbers ("what is 2 + 3?") and counts words ("count words in ...")."""
    text = input.text.strip()
    if match := _SUM.search(text):
        a, b = int(match.group(1)), int(match.group(2))
        result = await ctx.call_tool("tools-demo/add", a=a, b=b)
        total = (result.structured or {}).get("result")
        answer = result.text if result.is_error or total is None else f"{a} + {b} = {total}"
    elif match := _COUNT.search(text):
        result = await ctx.call_tool("tools-demo/word_count", text=match.group("text"))
        if result.is_error or result.structured is None:
            answer = result.text
        else:
            counts = result.structured
            yield counts
            answer = (
                f"That text has {counts['words']} words, {counts['characters']} characters "
                f"and {counts['lines']} lines."
            )
    elif text:
        answer = f"You said: {text}"
    else:
        answer = "Ask me to add numbers (what is 2 + 3?) or to count words in a text."
    delay = ctx.config.token_delay
    for token in _TOKEN.findall(answer):
        yield token
        if delay:
            await asyncio.sleep(delay)
