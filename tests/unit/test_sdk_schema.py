"""plugins_sdk: what a decorated function declares (schemas, descriptors) and what it refuses."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from google.protobuf import json_format
from pydantic import BaseModel, Field

from plugins_sdk import AgentContext, AgentInput, Blob, Plugin, ToolContext, ToolResult


def schema_of(app: Plugin, tool: str, field: str = "input_schema") -> dict[str, Any]:
    descriptor = app.tools[tool].descriptor
    return json_format.MessageToDict(getattr(descriptor, field))


def test_input_schema_comes_from_the_signature_without_the_context() -> None:
    app = Plugin("schemas")

    @app.tool()
    async def add(a: int, b: int, ctx: ToolContext) -> int:
        """Adds two integers."""
        return a + b

    assert schema_of(app, "add") == {
        "type": "object",
        "title": "add_arguments",
        "properties": {
            "a": {"title": "A", "type": "integer"},
            "b": {"title": "B", "type": "integer"},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    assert app.tools["add"].descriptor.description == "Adds two integers."


def test_defaults_descriptions_and_nested_models_appear_in_the_schema() -> None:
    app = Plugin("schemas")

    class Item(BaseModel):
        name: str
        qty: int = 1

    @app.tool()
    async def order(
        items: list[Item],
        note: Annotated[str, Field(description="for the kitchen")] = "",
        rush: bool = False,
    ) -> str:
        return "ok"

    schema = schema_of(app, "order")
    assert schema["required"] == ["items"]
    assert schema["properties"]["note"] == {
        "default": "",
        "description": "for the kitchen",
        "title": "Note",
        "type": "string",
    }
    assert schema["properties"]["rush"]["default"] is False
    assert schema["properties"]["items"]["items"] == {"$ref": "#/$defs/Item"}
    assert schema["$defs"]["Item"]["required"] == ["name"]


def test_parameter_names_that_shadow_model_attributes_still_work() -> None:
    app = Plugin("schemas")

    @app.tool()
    async def fetch(json: str, schema: int = 1, copy: bool = True) -> str:
        return json

    assert set(schema_of(app, "fetch")["properties"]) == {"json", "schema", "copy"}


def test_output_schema_wraps_non_objects_and_keeps_objects() -> None:
    app = Plugin("schemas")

    class Counts(BaseModel):
        words: int

    @app.tool()
    async def number() -> int:
        return 1

    @app.tool()
    async def counts() -> Counts:
        return Counts(words=1)

    @app.tool()
    async def text() -> str:
        return ""

    @app.tool()
    async def full() -> ToolResult:
        return ToolResult()

    @app.tool()
    async def image() -> Blob:
        return Blob(b"")

    assert schema_of(app, "number", "output_schema") == {
        "type": "object",
        "properties": {"result": {"type": "integer"}},
        "required": ["result"],
    }
    assert schema_of(app, "counts", "output_schema")["properties"] == {
        "words": {"title": "Words", "type": "integer"}
    }
    for unstructured in ("text", "full", "image"):
        assert not app.tools[unstructured].descriptor.HasField("output_schema"), unstructured


def test_annotations_and_title_are_declared_only_when_given() -> None:
    app = Plugin("schemas")

    @app.tool("look-up", title="Look up", read_only=True, open_world=False)
    async def look_up(q: str) -> str:
        return q

    descriptor = app.tools["look-up"].descriptor
    assert descriptor.name == "look-up"
    assert descriptor.title == "Look up"
    assert descriptor.annotations.read_only is True
    assert descriptor.annotations.open_world is False
    assert not descriptor.annotations.HasField("idempotent")
    assert not descriptor.annotations.HasField("destructive")


def test_bare_decorator_and_plain_function_stay_callable() -> None:
    app = Plugin("schemas")

    @app.tool
    def double(x: int) -> int:
        """Doubles."""
        return 2 * x

    assert double(4) == 8
    assert list(app.tools) == ["double"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("async def f(*args: int) -> int: return 1", "cannot be passed by name"),
        ("async def f(a: int, /) -> int: return 1", "cannot be passed by name"),
        ("async def f(**kw: int) -> int: return 1", "cannot be passed by name"),
        ("async def f(a: 'Missing') -> int: return 1", "cannot resolve"),
        ("async def f():\n    yield 1", "returns its result"),
    ],
)
def test_unsupported_tool_signatures_are_refused_at_decoration(source: str, message: str) -> None:
    app = Plugin("schemas")
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    with pytest.raises(TypeError, match=message):
        app.tool()(namespace["f"])


def test_names_are_checked_and_unique() -> None:
    app = Plugin("schemas")

    async def f() -> int:
        return 1

    app.tool("f")(f)
    with pytest.raises(ValueError, match="declared twice"):
        app.tool("f")(f)
    with pytest.raises(ValueError, match="must match"):
        app.tool("has space")(f)
    with pytest.raises(ValueError, match="lowercase"):
        Plugin("Bad_Name")


def test_plugin_name_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEMESH_PLUGIN", "from-env")
    assert Plugin().name == "from-env"
    monkeypatch.delenv("SIDEMESH_PLUGIN")
    with pytest.raises(ValueError, match="SIDEMESH_PLUGIN"):
        Plugin()


def test_agent_descriptor_has_capabilities_and_model_schemas() -> None:
    app = Plugin("agents", version="2.0.0")

    class Question(BaseModel):
        q: str

    class Answer(BaseModel):
        a: str

    @app.agent(capabilities=["chat", "qa"], output_model=Answer)
    async def oracle(input: Question, ctx: AgentContext) -> Any:
        """Answers questions."""
        yield Answer(a=input.q)

    @app.agent()
    async def plain(input: AgentInput) -> Any:
        yield input.text

    descriptor = app.agents["oracle"].descriptor
    assert list(descriptor.capabilities) == ["chat", "qa"]
    assert descriptor.description == "Answers questions."
    assert descriptor.version == "2.0.0"
    assert json_format.MessageToDict(descriptor.input_schema)["required"] == ["q"]
    assert json_format.MessageToDict(descriptor.output_schema)["required"] == ["a"]
    assert not app.agents["plain"].descriptor.HasField("input_schema")


def test_agents_must_be_async() -> None:
    app = Plugin("agents")

    def sync_agent(input: AgentInput) -> str:
        return ""

    with pytest.raises(TypeError, match="async"):
        app.agent()(sync_agent)
    with pytest.raises(TypeError, match="capabilities is a list"):
        app.agent(capabilities="chat")
