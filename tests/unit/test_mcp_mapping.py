"""The MCP mappings, without processes: MCP types to the mesh's messages and back, errors,
argument checks, watchers and the bridge's instructions (the gateway's side, the mesh as MCP:
test_mcp_gateway_mapping.py)."""

from __future__ import annotations

import base64
import json

import grpc
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from clients import InvalidArgumentError, NotFoundError
from sidecars.mcp import _convert as convert
from sidecars.mcp._arguments import check_arguments, compile_schema
from sidecars.mcp._catalog import ServerCatalog
from sidecars.mcp._errors import Lookup, to_status
from sidecars.mcp._spec import ServerSpec, SpecError
from sidecars.mcp._watchers import Watchers, list_changed, resource_updated
from sidemesh.core import struct_to_dict
from sidemesh.v1 import mcp_pb2

PNG = b"\x89PNG\r\n\x1a\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- MCP to the mesh -----------------------------------------------------------------------


def test_content_blocks_become_content_parts() -> None:
    text = convert.content(
        types.TextContent(text="hi", annotations=types.Annotations(audience=["user"], priority=1))
    )
    assert text.text == "hi"
    assert dict(text.annotations) == {"audience": ["user"], "priority": 1}
    image = convert.content(types.ImageContent(data=b64(PNG), mime_type="image/png"))
    assert (image.blob.data, image.blob.mime_type) == (PNG, "image/png")
    audio = convert.content(types.AudioContent(data=b64(b"RIFF"), mime_type="audio/wav"))
    assert audio.blob.mime_type == "audio/wav"
    link = convert.content(
        types.ResourceLink(uri="file:///a.md", name="a", mime_type="text/markdown", size=3)
    )
    assert (link.resource_link.uri, link.resource_link.size) == ("file:///a.md", 3)
    embedded = convert.content(
        types.EmbeddedResource(
            resource=types.BlobResourceContents(
                uri="x:1", mime_type="application/gzip", blob=b64(b"\x1f")
            )
        )
    )
    assert (embedded.resource.blob, embedded.resource.mime_type) == (b"\x1f", "application/gzip")
    text_resource = convert.content(
        types.EmbeddedResource(resource=types.TextResourceContents(uri="x:2", text="body"))
    )
    assert text_resource.resource.text == "body"
    assert not text_resource.HasField("annotations")


def test_tool_results_keep_is_error_and_structured_content() -> None:
    result = convert.tool_result(
        types.CallToolResult(
            content=[types.TextContent(text="bad timezone")], is_error=True,
            structured_content={"n": 1},
        )
    )  # fmt: skip
    assert result.is_error and result.content[0].text == "bad timezone"
    assert dict(result.structured_content) == {"n": 1}
    # 2026 servers may return any JSON value: it is wrapped, as the SDK wraps results.
    wrapped = convert.tool_result(types.CallToolResult(content=[], structured_content=[1, 2]))
    assert struct_to_dict(wrapped.structured_content) == {"result": [1, 2]}
    assert not convert.tool_result(types.CallToolResult(content=[])).HasField("structured_content")


def test_tool_descriptors_carry_schemas_titles_and_hints() -> None:
    tool = types.Tool(
        name="get-sum",
        description="Adds",
        input_schema={"type": "object", "properties": {"a": {"type": "number"}}},
        output_schema={"type": "object"},
        annotations=types.ToolAnnotations(title="Sum", read_only_hint=True, open_world_hint=False),
    )
    d = convert.tool_descriptor(tool)
    assert (d.name, d.title, d.description) == ("get-sum", "Sum", "Adds")
    assert d.input_schema["properties"]["a"]["type"] == "number"
    assert d.HasField("output_schema")
    assert d.annotations.read_only and not d.annotations.open_world
    assert not d.annotations.HasField("idempotent")  # unset hints stay unset
    bare = convert.tool_descriptor(types.Tool(name="t", input_schema={"type": "object"}))
    assert not bare.HasField("annotations") and not bare.HasField("output_schema")


def test_resources_templates_prompts_and_completions() -> None:
    r = convert.resource(types.Resource(uri="demo://1", name="one", mime_type="text/plain"))
    assert (r.uri, r.name, r.mime_type, r.HasField("size")) == (
        "demo://1",
        "one",
        "text/plain",
        False,
    )
    t = convert.resource_template(types.ResourceTemplate(uri_template="demo://{id}", name="t"))
    assert t.uri_template == "demo://{id}"
    p = convert.prompt(
        types.Prompt(name="p", arguments=[types.PromptArgument(name="city", required=True)])
    )
    assert [(a.name, a.required) for a in p.arguments] == [("city", True)]
    rendered = convert.prompt_result(
        types.GetPromptResult(
            messages=[types.PromptMessage(role="assistant", content=types.TextContent(text="ok"))]
        )
    )
    assert rendered.messages[0].role == mcp_pb2.PROMPT_ROLE_ASSISTANT
    done = convert.completion(
        types.CompleteResult(completion=types.Completion(values=["Engineering"], total=1))
    )
    assert (list(done.values), done.total, done.has_more) == (["Engineering"], 1, False)
    blob = convert.resource_contents(types.BlobResourceContents(uri="u", blob=b64(b"\x00\x01")))
    assert blob.blob == b"\x00\x01"


def test_capabilities() -> None:
    caps = convert.capabilities(
        types.ServerCapabilities(
            tools=types.ToolsCapability(list_changed=True),
            resources=types.ResourcesCapability(subscribe=True),
            completions=types.CompletionsCapability(),
        )
    )
    assert caps.tools and caps.tools_list_changed
    assert caps.resources and caps.resources_subscribe and not caps.resources_list_changed
    assert caps.completions and not caps.prompts and not caps.logging
    info = convert.server_info(None, "2026-07-28", None, None, "my-plugin")
    assert (info.name, info.protocol_version) == ("my-plugin", "2026-07-28")


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "lookup", "status"),
    [
        (types.INVALID_PARAMS, "", grpc.StatusCode.INVALID_ARGUMENT),
        (types.INVALID_PARAMS, "prompt", grpc.StatusCode.NOT_FOUND),
        (types.METHOD_NOT_FOUND, "", grpc.StatusCode.UNIMPLEMENTED),
        (types.REQUEST_TIMEOUT, "", grpc.StatusCode.DEADLINE_EXCEEDED),
        (types.CONNECTION_CLOSED, "", grpc.StatusCode.UNAVAILABLE),
        (-32002, "", grpc.StatusCode.NOT_FOUND),
        (-32099, "", grpc.StatusCode.INTERNAL),
    ],
)
def test_json_rpc_errors_map_to_grpc_codes(
    code: int, lookup: Lookup, status: grpc.StatusCode
) -> None:
    error = to_status(MCPError(code, "Prompt p not found"), "prompts/get p", lookup=lookup)
    assert error is not None and error.code == status
    if status == grpc.StatusCode.INTERNAL:
        assert "-32099" in error.message and "Prompt p not found" in error.message


def test_an_unknown_resource_is_not_found_however_the_server_words_it() -> None:
    for message in ("Resource demo://x not found", "Unknown resource: demo://x", "bad uri"):
        error = to_status(
            MCPError(types.INVALID_PARAMS, message), "resources/read", lookup="resource"
        )
        assert error is not None and error.code == grpc.StatusCode.NOT_FOUND
    # A prompt's invalid params are NOT_FOUND only when they say the prompt is unknown.
    missing = to_status(MCPError(types.INVALID_PARAMS, "Missing argument: city"), "prompts/get p",
                        lookup="prompt")  # fmt: skip
    assert missing is not None and missing.code == grpc.StatusCode.INVALID_ARGUMENT


def test_other_failures() -> None:
    gone = to_status(ConnectionResetError(), "tool 'x'")
    assert gone is not None and gone.code == grpc.StatusCode.UNAVAILABLE
    assert gone.retry_delay is not None
    bad = to_status(RuntimeError("Invalid structured content returned by tool x"), "tool 'x'")
    assert bad is not None and bad.code == grpc.StatusCode.INTERNAL
    assert to_status(KeyError("a bug"), "tool 'x'") is None  # reported as a sanitized UNKNOWN


# -- arguments and the catalog --------------------------------------------------------------


def test_arguments_are_checked_with_field_paths() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "a": {"type": "number"},
            "items": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        },
        "required": ["a"],
        "additionalProperties": False,
    }
    validator = compile_schema("t", schema)
    check_arguments("t", validator, {"a": 1, "items": [{"name": "x"}]})
    with pytest.raises(InvalidArgumentError) as err:
        check_arguments("t", validator, {"items": [{"name": "x"}, {}], "extra": 1})
    fields = {v.field for v in err.value.field_violations}
    assert fields == {"arguments", "arguments.a", "arguments.items[1].name"}
    assert err.value.reason == "INVALID_TOOL_ARGUMENTS"
    assert compile_schema("t", {"type": 12}) is None  # not a schema: not enforced


def test_catalog_accepts_qualified_names_and_names_the_tools_when_not_found() -> None:
    catalog = ServerCatalog("mcp-time")
    catalog.replace([types.Tool(name=n, input_schema={"type": "object"}) for n in ("b", "a")])
    assert [d.name for d in catalog.descriptors()] == ["a", "b"]
    assert catalog.tool("mcp-time/a").tool.name == "a"
    with pytest.raises(NotFoundError, match="its tools: a, b"):
        catalog.tool("other/a")


# -- watchers ------------------------------------------------------------------------------


async def test_watchers_dedupe_filter_by_uri_and_count_subscriptions() -> None:
    watchers = Watchers()
    first, new = watchers.add(["demo://1"])
    second, newer = watchers.add(["demo://1", "demo://2"])
    assert (new, newer) == (["demo://1"], ["demo://2"])
    for _ in range(3):
        watchers.publish(list_changed("tools_list_changed"))
    watchers.publish(resource_updated("demo://2"))
    assert (await first.next()).HasField("tools_list_changed")  # type: ignore[union-attr]
    watchers.close()
    assert await first.next() is None  # three changes, one event; not its resource
    kinds = [e.WhichOneof("event") for e in [await second.next(), await second.next()] if e]
    assert kinds == ["tools_list_changed", "resource_updated"]
    assert watchers.remove(first) == []
    assert watchers.remove(second) == ["demo://1", "demo://2"]


# -- the bridge's instructions ----------------------------------------------------------------


def test_spec_reads_the_manifest_section_and_says_what_is_wrong() -> None:
    spec = ServerSpec.from_json(
        json.dumps({"command": "node", "args": ["x.js"], "request_timeout": 45, "future": 1})
    )
    assert (spec.command, spec.args, spec.transport) == ("node", ("x.js",), "stdio")
    assert spec.startup_timeout == 20  # capped below the orchestrator's default startup timeout
    with pytest.raises(SpecError, match="needs 'url'"):
        ServerSpec.from_json('{"command": "x", "transport": "streamable-http"}')
    with pytest.raises(SpecError, match="not JSON"):
        ServerSpec.from_json("{")
