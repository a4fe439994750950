"""The MCP gateway's mappings, without processes: the mesh's catalog, content and errors as
MCP, and the names ``sidemesh mcp`` gives (the bridge's side: test_mcp_mapping.py)."""

from __future__ import annotations

import base64

import mcp_types as types

from clients import InvalidArgumentError, SidemeshError
from orchestrator.gateway import View, mcp_name
from orchestrator.gateway._catalog import tool_targets
from orchestrator.gateway._convert import content
from orchestrator.gateway._server import mcp_error
from sidemesh.core import to_struct
from sidemesh.v1 import agent_pb2, common_pb2, tool_pb2

PNG = b"\x89PNG\r\n\x1a\n"


# -- the MCP gateway (sidemesh mcp, the HTTP endpoint) ----------------------------------------


def test_mcp_names_are_unambiguous_and_within_mcps_limits() -> None:
    assert mcp_name("tools-demo/add") == "tools-demo.add"
    assert mcp_name("mcp-time/get.time") == "mcp-time.get.time"  # split at the first dot
    assert mcp_name("assistant/assistant", agent=True) == "agent_assistant.assistant"
    long_a, long_b = "p/" + "a" * 130, "p/" + "a" * 129 + "b"
    short_a, short_b = mcp_name(long_a), mcp_name(long_b)
    assert len(short_a) == len(short_b) == 128
    assert short_a != short_b and short_a == mcp_name(long_a)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    assert set(short_a) <= allowed


def test_mesh_catalog_as_mcp_tools() -> None:
    tool = tool_pb2.ToolDescriptor(
        name="add", qualified_name="tools-demo/add", description="Adds",
        input_schema=to_struct({"type": "object", "properties": {"a": {"type": "integer"}}}),
        annotations=tool_pb2.ToolAnnotations(read_only=True),
    )  # fmt: skip
    agent = agent_pb2.AgentDescriptor(name="assistant", qualified_name="assistant/assistant")
    targets = tool_targets([tool], [agent], set(), View())
    assert list(targets) == ["agent_assistant.assistant", "tools-demo.add"]
    added = targets["tools-demo.add"]
    assert (added.qualified, added.agent) == ("tools-demo/add", False)
    assert added.tool.annotations is not None and added.tool.annotations.read_only_hint
    assert added.tool.annotations.idempotent_hint is None
    assistant = targets["agent_assistant.assistant"]
    assert assistant.agent and assistant.tool.input_schema["required"] == ["text"]


def test_mesh_content_and_errors_as_mcp() -> None:
    image = content(common_pb2.Content(blob=common_pb2.Blob(data=PNG, mime_type="image/png")))
    assert isinstance(image, types.ImageContent) and base64.b64decode(image.data) == PNG
    other = content(common_pb2.Content(blob=common_pb2.Blob(data=b"z", mime_type="x/y")))
    assert isinstance(other, types.EmbeddedResource)
    link = content(common_pb2.Content(resource_link=common_pb2.ResourceLink(uri="u")))
    assert isinstance(link, types.ResourceLink) and link.name == "u"
    bad = mcp_error(InvalidArgumentError("invalid arguments for tool 'x': a: missing"))
    assert bad.code == types.INVALID_PARAMS and bad.message.startswith("INVALID_ARGUMENT: ")
    down = mcp_error(SidemeshError("boom"))
    assert down.code == types.INTERNAL_ERROR and "UNKNOWN: boom" in down.message
