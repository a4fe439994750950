"""plugins_sdk tools served behind real gRPC: what a caller sees."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from clients import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnknownError,
)
from plugins_sdk import Blob, Plugin, ToolContext, ToolError, ToolResult
from plugins_sdk.testing import PluginHarness

app = Plugin("calc", version="1.2.3", description="tools under test")
#: What handlers observed, for the assertions.
seen: dict[str, Any] = {}
started = asyncio.Event()


class Item(BaseModel):
    name: str
    qty: int = 1


class Summary(BaseModel):
    lines: int
    total: int


@app.tool(read_only=True, idempotent=True)
async def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@app.tool()
async def order(items: list[Item], note: str = "") -> Summary:
    return Summary(lines=len(items), total=sum(i.qty for i in items))


@app.tool()
def shout(text: str) -> str:
    return text.upper() + "!"


@app.tool()
async def returns(kind: str) -> Any:
    values: dict[str, Any] = {
        "bytes": b"\x00\x01",
        "blob": Blob(b"PNG", "image/png"),
        "dict": {"a": 1, "b": [1, 2]},
        "list": [1, 2, 3],
        "bool": True,
        "none": None,
        "full": ToolResult(["one", b"two"], structured={"k": "v"}),
    }
    return values[kind]


@app.tool()
async def fails(kind: str) -> str:
    if kind == "tool-error":
        raise ToolError("no such city: Atlantis")
    if kind == "denied":
        raise PermissionDeniedError("you may not", reason="NOPE")
    raise ValueError("secret-token-123 leaked in a message")


@app.tool()
async def steps(n: int, ctx: ToolContext) -> str:
    for i in range(1, n + 1):
        await ctx.report_progress(i, n, f"step {i}")
        if i == 2:
            await ctx.log("halfway", level="warning")
    return "done"


@app.tool()
async def wait_forever(ctx: ToolContext) -> str:
    started.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        seen["cancelled"] = ctx.cancelled
        raise
    return "never"


@app.tool()
async def call_facts(ctx: ToolContext) -> dict[str, Any]:
    return {
        "remaining": ctx.time_remaining(),
        "call_id": ctx.call_id,
        "caller": ctx.caller,
        "plugin": ctx.plugin,
        "logger": ctx.logger.name,
    }


@pytest.fixture
async def h() -> AsyncIterator[PluginHarness]:
    seen.clear()
    started.clear()
    async with PluginHarness(app) as harness:
        yield harness


async def test_typed_call_returns_structured_and_text(h: PluginHarness) -> None:
    result = await h.client.call_tool("add", a=2, b=3)
    assert result.structured == {"result": 5}
    assert result.text == "5"
    assert result.is_error is False


async def test_whole_doubles_validate_as_ints_and_models_are_structured(h: PluginHarness) -> None:
    result = await h.client.call_tool(
        "order", items=[{"name": "tea", "qty": 2.0}, {"name": "cake"}]
    )
    assert result.structured == {"lines": 2, "total": 3}
    assert result.text == '{"lines":2,"total":3}'


async def test_qualified_name_of_the_plugin_itself_is_accepted(h: PluginHarness) -> None:
    assert (await h.client.call_tool("calc/add", a=1, b=1)).structured == {"result": 2}


async def test_invalid_arguments_name_each_bad_field(h: PluginHarness) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await h.client.call_tool(
            "order",
            items=[{"name": "tea"}, {"qty": 2}, {"name": "cake", "qty": "many"}],
            extra=1,
        )
    error = info.value
    assert error.reason == "INVALID_TOOL_ARGUMENTS"
    assert {v.field for v in error.field_violations} == {
        "arguments.items[1].name",
        "arguments.items[2].qty",
        "arguments.extra",
    }
    assert "invalid arguments for tool 'order'" in error.message
    assert "items[1].name: required, but missing" in error.message
    assert "extra: unexpected field" in error.message


async def test_fractional_number_for_an_int_is_rejected(h: PluginHarness) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await h.client.call_tool("add", a=2.5, b=1)
    assert [v.field for v in info.value.field_violations] == ["arguments.a"]
    assert "fractional part" in info.value.message


async def test_unknown_tool_is_not_found_and_names_the_tools(h: PluginHarness) -> None:
    with pytest.raises(NotFoundError, match=r"no tool 'nope'.*add, order"):
        await h.client.call_tool("nope")
    with pytest.raises(NotFoundError):
        await h.client.call_tool("other-plugin/add", a=1, b=2)


async def test_sync_tools_run(h: PluginHarness) -> None:
    assert (await h.client.call_tool("shout", text="hi")).text == "HI!"


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("bytes", lambda r: r.content[0].blob.data == b"\x00\x01"),
        ("blob", lambda r: r.content[0].blob.mime_type == "image/png"),
        ("dict", lambda r: r.structured == {"a": 1, "b": [1, 2]}),
        ("list", lambda r: r.structured == {"result": [1, 2, 3]} and r.text == "[1,2,3]"),
        ("bool", lambda r: r.structured == {"result": True} and r.text == "true"),
        ("none", lambda r: r.content == [] and r.structured is None),
        (
            "full",
            lambda r: (
                r.text == "one" and r.content[1].blob.data == b"two" and r.structured == {"k": "v"}
            ),
        ),
    ],
)
async def test_return_values_become_results(h: PluginHarness, kind: str, check: Any) -> None:
    result = await h.client.call_tool("returns", kind=kind)
    assert check(result), result.raw


async def test_tool_error_is_an_error_result_not_a_status(h: PluginHarness) -> None:
    result = await h.client.call_tool("fails", kind="tool-error")
    assert result.is_error is True
    assert result.text == "no such city: Atlantis"


async def test_sidemesh_error_keeps_its_status(h: PluginHarness) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        await h.client.call_tool("fails", kind="denied")
    assert info.value.message == "you may not"
    assert info.value.reason == "NOPE"


async def test_unexpected_exception_is_unknown_sanitized_and_logged(
    h: PluginHarness, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(UnknownError) as info:
        await h.client.call_tool("fails", kind="bug", metadata=[("sidemesh-call-id", "call-42")])
    assert info.value.message == (
        "tool 'fails' failed: ValueError (call id call-42); see the plugin log"
    )
    assert "secret" not in info.value.message
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "call-42" in logged[-1].getMessage()
    assert logged[-1].exc_info is not None
    assert "secret-token-123" in str(logged[-1].exc_info[1])


async def test_progress_and_logs_arrive_in_order_before_the_result(h: PluginHarness) -> None:
    events = [e async for e in h.client.call_tool_stream("steps", n=3)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress", "progress", "log", "progress", "result"]
    assert [e.progress.progress for e in events if e.HasField("progress")] == [1, 2, 3]
    assert events[0].progress.total == 3
    assert events[0].progress.message == "step 1"
    assert events[2].log.message == "halfway"
    assert events[2].log.logger == "calc.steps"
    assert events[-1].result.content[0].text == "done"


async def test_client_cancel_cancels_the_handler(h: PluginHarness) -> None:
    call = asyncio.create_task(h.client.call_tool("wait_forever"))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(100):
        if "cancelled" in seen:
            break
        await asyncio.sleep(0.01)
    assert seen == {"cancelled": True}


async def test_deadline_is_honoured_and_cancels_the_handler(h: PluginHarness) -> None:
    with pytest.raises(DeadlineExceededError):
        await h.client.call_tool("wait_forever", timeout=0.2)
    for _ in range(100):
        if "cancelled" in seen:
            break
        await asyncio.sleep(0.01)
    assert seen == {"cancelled": True}


async def test_context_reports_the_call(h: PluginHarness) -> None:
    facts = (
        await h.client.call_tool(
            "call_facts",
            timeout=5,
            metadata=[("sidemesh-call-id", "abc"), ("sidemesh-caller", "other")],
        )
    ).structured
    assert facts is not None
    assert 0 < facts["remaining"] < 5.1
    assert facts["call_id"] == "abc"
    assert facts["caller"] == "other"
    assert facts["plugin"] == "calc"
    assert facts["logger"] == "calc.call_facts"
    no_deadline = (await h.client.call_tool("call_facts")).structured
    assert no_deadline is not None
    assert no_deadline["remaining"] is None
    assert no_deadline["caller"] == ""
    assert len(no_deadline["call_id"]) == 16


async def test_list_tools_gives_the_descriptors(h: PluginHarness) -> None:
    tools = await h.client.list_tools()
    assert [t.name for t in tools] == sorted(app.tools)
    assert tools[0].qualified_name == "calc/add"
