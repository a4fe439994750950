"""A line on an MCP server's stdout that is not JSON-RPC is reported in one line."""

from __future__ import annotations

import mcp_types as types
import pydantic
import pytest

from sidecars.mcp._notifications import unreadable


@pytest.mark.parametrize(
    ("line", "said"),
    [("starting server on port 3000", "'starting server on port 3000'"),
     ('{"hello": 1}', "\"{'hello': 1}\"")],
)  # fmt: skip
def test_what_was_wrong_fits_one_line(line: str, said: str) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    assert len(str(raised.value).splitlines()) > 1  # what the SDK hands the bridge
    assert unreadable(raised.value) == said


def test_a_long_line_is_cut() -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        types.jsonrpc_message_adapter.validate_json("x" * 10_000, by_name=False)
    assert len(unreadable(raised.value)) <= 202
