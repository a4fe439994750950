"""``Plugin``: the object a plugin module defines, holding its tools, agents and config model."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import pydantic
import yaml

from plugins_sdk._agents import AgentSpec
from plugins_sdk._schema import json_path
from plugins_sdk._tools import ToolSpec
from sidemesh.core import (
    CONTRACT_VERSION,
    FieldViolation,
    InvalidArgumentError,
    SidecarEnv,
    is_item_name,
    is_plugin_name,
)
from sidemesh.v1 import plugin_pb2, tool_pb2

if TYPE_CHECKING:
    from plugins_sdk._interceptors import Interceptor

F = TypeVar("F", bound=Callable[..., Any])

#: The environment variable the orchestrator sets to the plugin's name.
PLUGIN_ENV = SidecarEnv.PLUGIN
#: The SDK's name and version, reported in ``PluginInfo.runtime``.
RUNTIME = "sidemesh-python/0.1.0"

#: The manifest's file name, beside the plugin's module.
MANIFEST_FILE = "plugin.yaml"
_MAX_MANIFEST = 1 << 20


class Plugin:
    """A plugin: a named set of tools and agents, served by ``run`` or the sidecar runtime.

    Each fact is written once. The plugin's identity is its manifest's: ``name``
    defaults to ``$SIDEMESH_PLUGIN`` (set by the orchestrator from the manifest),
    and ``version`` and ``description``, when left out, are the manifest's too.
    What it implements is the code's: its tools and agents, and ``config_model``,
    the schema of the operator's config (validated at start, then ``ctx.config``;
    without one, ``ctx.config`` is the config as a dict). ``sidemesh validate``
    checks the two against each other (``facts``). ``interceptors`` run around
    every call the plugin serves (see ``Interceptor``).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        version: str = "",
        description: str = "",
        config_model: type[pydantic.BaseModel] | None = None,
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        #: What the code states itself, rather than leaving it to the manifest.
        self._in_code = {"name": name, "version": version, "description": description}
        told = name and version and description  # all stated: no manifest to read
        manifest = {} if told else _manifest_beside(sys._getframe(1).f_globals.get("__file__"))
        name = name or os.environ.get(PLUGIN_ENV, "") or str(manifest.get("name") or "")
        if not name:
            raise ValueError(
                f"give the plugin a name: in a plugin.yaml beside its module, Plugin('my-plugin'), "
                f"or ${PLUGIN_ENV}"
            )
        version = version or str(manifest.get("version") or "")
        description = description or str(manifest.get("description") or "")
        if not is_plugin_name(name):
            raise ValueError(
                f"plugin name {name!r} must be lowercase letters, digits and '-', "
                "starting with a letter (at most 63 characters)"
            )
        self.name = name
        self.version = version
        self.description = description
        self.config_model = config_model
        #: Hooks around every call the plugin serves, outermost first (``plugins_sdk.Interceptor``).
        self.interceptors: tuple[Interceptor, ...] = tuple(interceptors)
        self._tools: dict[str, ToolSpec] = {}
        self._agents: dict[str, AgentSpec] = {}

    def __repr__(self) -> str:
        return f"Plugin({self.name!r}, tools={list(self._tools)}, agents={list(self._agents)})"

    @property
    def tools(self) -> Mapping[str, ToolSpec]:
        """The plugin's tools by name, in the order they were declared."""
        return MappingProxyType(self._tools)

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        """The plugin's agents by name, in the order they were declared."""
        return MappingProxyType(self._agents)

    # -- declaring tools and agents --------------------------------------------

    @overload
    def tool(self, name: F, /) -> F: ...

    @overload
    def tool(
        self,
        name: str | None = None,
        /,
        *,
        title: str = "",
        description: str | None = None,
        read_only: bool | None = None,
        idempotent: bool | None = None,
        destructive: bool | None = None,
        open_world: bool | None = None,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        name: str | F | None = None,
        /,
        *,
        title: str = "",
        description: str | None = None,
        read_only: bool | None = None,
        idempotent: bool | None = None,
        destructive: bool | None = None,
        open_world: bool | None = None,
    ) -> F | Callable[[F], F]:
        """Declares a tool: ``@app.tool()`` (or ``@app.tool``) on a typed function.

        The input schema comes from the parameters, the description from the
        docstring, and the output schema from the return annotation. The
        function is returned unchanged, so it can still be called directly.
        """
        localns = _caller_locals()
        annotations = tool_pb2.ToolAnnotations(
            read_only=read_only,
            idempotent=idempotent,
            destructive=destructive,
            open_world=open_world,
        )

        def register(fn: F) -> F:
            tool_name = name if isinstance(name, str) else fn.__name__
            self._check_new(tool_name, self._tools, "tool")
            self._tools[tool_name] = ToolSpec(
                fn,
                plugin=self.name,
                name=tool_name,
                title=title,
                description=description if description is not None else _doc(fn),
                annotations=annotations,
                localns=localns,
            )
            return fn

        return register(name) if callable(name) else register

    @overload
    def agent(self, name: F, /) -> F: ...

    @overload
    def agent(
        self,
        name: str | None = None,
        /,
        *,
        description: str | None = None,
        capabilities: Sequence[str] = (),
        input_model: type[pydantic.BaseModel] | None = None,
        output_model: type[pydantic.BaseModel] | None = None,
    ) -> Callable[[F], F]: ...

    def agent(
        self,
        name: str | F | None = None,
        /,
        *,
        description: str | None = None,
        capabilities: Sequence[str] = (),
        input_model: type[pydantic.BaseModel] | None = None,
        output_model: type[pydantic.BaseModel] | None = None,
    ) -> F | Callable[[F], F]:
        """Declares an agent: an async generator ``(input, ctx)`` yielding its events.

        It yields text (``str``), structured output (dicts or pydantic models),
        ``Progress``, ``Log`` and at most one final ``Result``. ``input`` is an
        ``AgentInput``, or an ``input_model`` instance parsed from its data.
        """
        localns = _caller_locals()
        if isinstance(capabilities, str):
            raise TypeError("capabilities is a list of names, e.g. capabilities=['chat']")

        def register(fn: F) -> F:
            agent_name = name if isinstance(name, str) else fn.__name__
            self._check_new(agent_name, self._agents, "agent")
            self._agents[agent_name] = AgentSpec(
                fn,
                plugin=self.name,
                name=agent_name,
                description=description if description is not None else _doc(fn),
                version=self.version,
                capabilities=list(capabilities),
                input_model=input_model,
                output_model=output_model,
                localns=localns,
            )
            return fn

        return register(name) if callable(name) else register

    @staticmethod
    def _check_new(name: str, existing: Mapping[str, object], kind: str) -> None:
        if not is_item_name(name):
            raise ValueError(f"{kind} name {name!r} must match [A-Za-z0-9_.-]{{1,128}}")
        if name in existing:
            raise ValueError(f"{kind} {name!r} is declared twice")

    # -- what the runtime asks ---------------------------------------------------

    def describe(self) -> plugin_pb2.DescribeResponse:
        """The plugin's identity and everything it provides (``PluginService.Describe``)."""
        return plugin_pb2.DescribeResponse(
            plugin=plugin_pb2.PluginInfo(
                name=self.name,
                version=self.version,
                description=self.description,
                contract_version=CONTRACT_VERSION,
                runtime=RUNTIME,
            ),
            agents=[spec.descriptor for spec in self._agents.values()],
            tools=[spec.descriptor for spec in self._tools.values()],
        )

    def facts(self) -> dict[str, Any]:
        """What the code states about the plugin, for checking against its manifest.

        ``name``, ``version`` and ``description`` are None where the code leaves
        them to the manifest; ``config_schema`` is ``config_model``'s JSON Schema.
        """
        return {
            **{fact: said or None for fact, said in self._in_code.items()},
            "tools": list(self._tools),
            "agents": list(self._agents),
            "config_schema": (
                self.config_model.model_json_schema() if self.config_model is not None else None
            ),
        }

    def validate_config(self, data: Mapping[str, Any]) -> Any:
        """The config ``ctx.config`` shows: a ``config_model`` instance, else a dict.

        Raises ``InvalidArgumentError`` naming each bad field as ``config.<path>``.
        """
        if self.config_model is None:
            return dict(data)
        try:
            return self.config_model.model_validate(data)
        except pydantic.ValidationError as exc:
            violations = [
                FieldViolation(json_path("config", e["loc"]), e["msg"])
                for e in exc.errors(include_url=False)
            ]
            listed = "; ".join(f"{v.field}: {v.description}" for v in violations)
            raise InvalidArgumentError(
                f"invalid config for plugin {self.name!r}: {listed}",
                reason="INVALID_CONFIG",
                field_violations=violations,
            ) from None


def _doc(fn: Callable[..., Any]) -> str:
    return inspect.getdoc(fn) or ""


def _manifest_beside(module_file: object) -> dict[str, Any]:
    """The ``plugin.yaml`` in the directory of the module making the Plugin, as a dict.

    Identity is stated once, in the manifest: what the code leaves out comes from
    there. Nothing (an empty dict) when there is no readable manifest.
    """
    if not isinstance(module_file, str):
        return {}
    try:
        text = (Path(module_file).resolve().parent / MANIFEST_FILE).read_text(encoding="utf-8")
        data = yaml.safe_load(text[:_MAX_MANIFEST])
    except (OSError, UnicodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _caller_locals() -> dict[str, Any]:
    """The locals of the code calling the decorator, to resolve annotations of local types."""
    frame = sys._getframe(2)
    return dict(frame.f_locals)
