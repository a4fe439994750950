"""The bundled example plugins, through the harness, and their manifests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from clients import InvalidArgumentError
from plugins_sdk import Plugin
from plugins_sdk.testing import PluginHarness

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"


def load_example(directory: str) -> tuple[dict[str, Any], Plugin]:
    """The plugin's manifest and the app its ``app: module:attr`` names."""
    manifest = yaml.safe_load((EXAMPLES / directory / "plugin.yaml").read_text())
    module_name, _, attr = manifest["app"].partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        path = EXAMPLES / directory / f"{module_name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    assert isinstance(module, ModuleType)
    app = getattr(module, attr)
    assert isinstance(app, Plugin)
    return manifest, app


TOOLS_MANIFEST, TOOLS = load_example("tools-demo")
ASSISTANT_MANIFEST, ASSISTANT = load_example("assistant")


# -- manifests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "app"), [(TOOLS_MANIFEST, TOOLS), (ASSISTANT_MANIFEST, ASSISTANT)]
)
def test_manifest_matches_what_the_app_describes(manifest: dict[str, Any], app: Plugin) -> None:
    assert manifest["runtime"] == "python"
    assert manifest["name"] == app.name
    assert manifest["version"] == app.version
    assert manifest["provides"].get("tools", []) == list(app.tools)
    assert manifest["provides"].get("agents", []) == list(app.agents)


def test_orchestrator_accepts_the_manifests() -> None:
    from orchestrator import load_manifest

    for name in ("tools-demo", "assistant"):
        manifest = load_manifest(EXAMPLES / name)
        assert manifest.name == name


def test_permissions_and_each_fact_once() -> None:
    assert TOOLS_MANIFEST["permissions"]["tools"] == []
    assert ASSISTANT_MANIFEST["permissions"]["tools"] == ["tools-demo/*"]
    # The config is the code's; identity is the manifest's, which Plugin() read.
    assert "config_schema" not in ASSISTANT_MANIFEST
    assert ASSISTANT.config_model is not None
    assert ASSISTANT.config_model.model_fields["token_delay"].default == 0.02
    for app, manifest in ((ASSISTANT, ASSISTANT_MANIFEST), (TOOLS, TOOLS_MANIFEST)):
        assert (app.name, app.version, app.description) == (
            manifest["name"],
            manifest["version"],
            manifest["description"],
        )
        assert app.facts()["name"] is None and app.facts()["version"] is None


# -- tools-demo --------------------------------------------------------------------


async def test_tools_demo_tools() -> None:
    async with PluginHarness(TOOLS) as h:
        assert (await h.client.call_tool("add", a=2, b=3)).structured == {"result": 5}
        counts = await h.client.call_tool("word_count", text="one two\nthree")
        assert counts.structured == {"words": 3, "characters": 13, "lines": 2}
        assert (await h.client.call_tool("divide", a=1, b=4)).structured == {"result": 0.25}
        by_zero = await h.client.call_tool("divide", a=1, b=0)
        assert by_zero.is_error and by_zero.text == "cannot divide 1.0 by zero"
        with pytest.raises(InvalidArgumentError) as info:
            await h.client.call_tool("slow_count", n=5000)
        assert [v.field for v in info.value.field_violations] == ["arguments.n"]


async def test_slow_count_reports_progress_each_step() -> None:
    async with PluginHarness(TOOLS) as h:
        events = [e async for e in h.client.call_tool_stream("slow_count", n=3, delay=0)]
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.progress, p.total, p.message) for p in progress] == [
        (1, 3, "counted 1 of 3"),
        (2, 3, "counted 2 of 3"),
        (3, 3, "counted 3 of 3"),
    ]
    assert events[-1].result.content[0].text == "counted to 3"


def test_tools_demo_schemas_and_hints() -> None:
    add = TOOLS.tools["add"].descriptor
    assert add.annotations.read_only and add.annotations.idempotent
    assert add.description == "Adds two integers."
    output = json_format.MessageToDict(TOOLS.tools["word_count"].descriptor.output_schema)
    assert set(output["properties"]) == {"words", "characters", "lines"}
    slow = json_format.MessageToDict(TOOLS.tools["slow_count"].descriptor.input_schema)
    assert slow["properties"]["n"]["maximum"] == 1000
    assert "ctx" not in slow["properties"]


# -- assistant ---------------------------------------------------------------------


async def test_assistant_adds_with_a_tool_and_streams_tokens() -> None:
    async with PluginHarness(ASSISTANT, config={"token_delay": 0}, mesh_apps=[TOOLS]) as h:
        reply = await h.client.invoke("assistant", "what is 2 + 3?").collect()
    kinds = [e.WhichOneof("event") for e in reply.events]
    assert kinds[:2] == ["tool_call_started", "tool_call_finished"]
    assert reply.events[0].tool_call_started.tool == "tools-demo/add"
    assert kinds.count("text_delta") == 5
    assert reply.text == "2 + 3 = 5"
    assert reply.result.usage.tool_calls == 1


async def test_assistant_counts_words_with_structured_output() -> None:
    async with PluginHarness(ASSISTANT, config={"token_delay": 0}, mesh_apps=[TOOLS]) as h:
        reply = await h.client.invoke("assistant", "count words in the quick brown fox").collect()
    assert reply.outputs == [{"words": 4, "characters": 19, "lines": 1}]
    assert reply.text == "That text has 4 words, 19 characters and 1 lines."


async def test_assistant_echoes_and_chats() -> None:
    async with PluginHarness(ASSISTANT, mesh_apps=[TOOLS]) as h:
        assert (await h.client.invoke("assistant", "hello there").collect()).text == (
            "You said: hello there"
        )
        async with h.client.chat(capability="math") as chat:
            assert (await chat.turn("1 + 1")).text == "1 + 1 = 2"
            assert (await chat.turn("hi")).text == "You said: hi"


async def test_assistant_rejects_a_bad_token_delay() -> None:
    with pytest.raises(InvalidArgumentError, match=r"config\.token_delay"):
        async with PluginHarness(ASSISTANT, config={"token_delay": 5}):
            pass
