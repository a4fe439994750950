"""What the mesh offers, and how a request's target name resolves to a plugin."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jsonschema
from google.protobuf import json_format, struct_pb2

from sidemesh.core import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    SidemeshError,
    is_item_name,
    is_plugin_name,
    qualify,
    split_target,
    struct_to_dict,
)
from sidemesh.v1 import agent_pb2, mcp_pb2, tool_pb2

log = logging.getLogger("sidemesh.catalog")

D = TypeVar("D", agent_pb2.AgentDescriptor, tool_pb2.ToolDescriptor)


@dataclass(frozen=True, slots=True)
class Entry(Generic[D]):
    """An agent or tool: where it lives and what it is."""

    plugin: str
    name: str
    qualified: str
    descriptor: D


@dataclass(frozen=True, slots=True)
class ToolEntry(Entry[tool_pb2.ToolDescriptor]):
    """A tool, with its input schema compiled once."""

    validator: jsonschema.protocols.Validator | None

    def check_arguments(self, arguments: struct_pb2.Struct) -> None:
        """Raises ``INVALID_ARGUMENT`` naming every field that breaks the input schema."""
        if self.validator is None:
            return
        value = struct_to_dict(arguments)
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if not errors:
            return
        violations = [_violation(e) for e in errors[:20]]
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        raise InvalidArgumentError(
            f"invalid arguments for tool {self.qualified!r}: {summary}",
            reason="INVALID_TOOL_ARGUMENTS",
            metadata={"tool": self.qualified},
            field_violations=violations,
        )


AgentEntry = Entry[agent_pb2.AgentDescriptor]


def _violation(error: jsonschema.ValidationError) -> FieldViolation:
    path = "arguments"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.validator == "required" and isinstance(error.instance, dict):
        # jsonschema reports a missing property at its parent; name the property itself.
        required: list[str] = list(error.validator_value)  # type: ignore[arg-type]
        missing = [p for p in required if p not in error.instance]
        if missing:
            return FieldViolation(f"{path}.{missing[0]}", "required property is missing")
    return FieldViolation(path, error.message)


class _Index(Generic[D]):
    """Entries by qualified name and by short name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.by_qualified: dict[str, Entry[D]] = {}
        self.by_short: dict[str, list[Entry[D]]] = {}

    def rebuild(self, entries: Iterable[Entry[D]]) -> None:
        self.by_qualified = {e.qualified: e for e in sorted(entries, key=lambda e: e.qualified)}
        self.by_short = {}
        for entry in self.by_qualified.values():
            self.by_short.setdefault(entry.name, []).append(entry)

    def resolve(self, target: str) -> Entry[D]:
        plugin, name = split_target(target)
        if not target or (plugin and not is_plugin_name(plugin)) or not is_item_name(name):
            raise InvalidArgumentError(
                f"{target!r} is not a {self.kind} name: use plugin/{self.kind} or a unique "
                f"{self.kind} name (letters, digits, '_', '.', '-')",
                reason="MALFORMED_TARGET",
            )
        if plugin:
            entry = self.by_qualified.get(target)
            if entry is not None:
                return entry
        else:
            matches = self.by_short.get(name, [])
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                choices = ", ".join(e.qualified for e in matches)
                raise InvalidArgumentError(
                    f"{self.kind} name {name!r} is ambiguous: use one of {choices}",
                    reason="AMBIGUOUS_TARGET",
                    metadata={"candidates": choices},
                )
        raise self.not_found(target)

    def not_found(self, target: str) -> NotFoundError:
        names = list(self.by_qualified) + list(self.by_short)
        close = difflib.get_close_matches(target, names, n=3, cutoff=0.4)
        if close:
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?"
        elif names:
            hint = f"; known {self.kind}s: {', '.join(sorted(self.by_qualified)[:10])}"
        else:
            hint = f"; the mesh has no {self.kind}s yet"
        return NotFoundError(
            f"no {self.kind} named {target!r}{hint}",
            reason="TARGET_NOT_FOUND",
            metadata={"suggestions": ",".join(close)},
        )


class Catalog:
    """Every agent, tool and MCP server the mesh knows, indexed for routing.

    What a plugin *declares* in its manifest is known before it starts: a call
    to a plugin that is not serving (STARTING, FAILED, CRASH_LOOP) is then
    UNAVAILABLE with the plugin's state (:attr:`not_serving`), not NOT_FOUND.
    """

    def __init__(self) -> None:
        #: Plugin name -> the error for a call to it when it has no ready replica, or None
        #: when it serves (set by the orchestrator).
        self.not_serving: Callable[[str], SidemeshError | None] = lambda _plugin: None
        self._declared: dict[str, dict[str, set[str]]] = {"agent": {}, "tool": {}}
        self._agents_of: dict[str, list[AgentEntry]] = {}
        self._tools_of: dict[str, list[ToolEntry]] = {}
        self._mcp: dict[str, mcp_pb2.McpServerInfo] = {}
        self._agents: _Index[agent_pb2.AgentDescriptor] = _Index("agent")
        self._tools: _Index[tool_pb2.ToolDescriptor] = _Index("tool")

    def set_plugin(
        self,
        plugin: str,
        agents: Iterable[agent_pb2.AgentDescriptor],
        tools: Iterable[tool_pb2.ToolDescriptor],
        mcp_server: mcp_pb2.McpServerInfo | None = None,
    ) -> None:
        """Replaces what ``plugin`` offers (from its ``Describe``)."""
        self._agents_of[plugin] = [_agent_entry(plugin, d) for d in agents]
        self._tools_of[plugin] = [_tool_entry(plugin, d) for d in tools]
        if mcp_server is not None:
            self._mcp[plugin] = mcp_server
        else:
            self._mcp.pop(plugin, None)
        self._rebuild()

    def declare(self, plugin: str, agents: Iterable[str], tools: Iterable[str]) -> None:
        """Records what ``plugin``'s manifest says it provides (before it starts)."""
        for kind, names in (("agent", agents), ("tool", tools)):
            for name in names:
                self._declared[kind].setdefault(name, set()).add(plugin)

    def _not_serving(self, kind: str, target: str) -> None:
        """Raises UNAVAILABLE when ``target`` belongs to a plugin that is not serving."""
        plugin, name = split_target(target)
        owners = {plugin} if plugin else self._declared[kind].get(name, set())
        for owner in sorted(owners):
            error = self.not_serving(owner)
            if error is not None:
                raise error

    def remove_plugin(self, plugin: str) -> None:
        """Forgets everything ``plugin`` offered."""
        self._agents_of.pop(plugin, None)
        self._tools_of.pop(plugin, None)
        self._mcp.pop(plugin, None)
        self._rebuild()

    def _rebuild(self) -> None:
        self._agents.rebuild(e for entries in self._agents_of.values() for e in entries)
        self._tools.rebuild(e for entries in self._tools_of.values() for e in entries)

    # -- resolution ----------------------------------------------------------

    def tool(self, target: str) -> ToolEntry:
        """The tool a request names; ``NOT_FOUND`` / ``INVALID_ARGUMENT`` otherwise."""
        try:
            entry = self._tools.resolve(target)
        except NotFoundError:
            self._not_serving("tool", target)
            raise
        assert isinstance(entry, ToolEntry)
        return entry

    def agent(self, target: str, capability: str = "") -> AgentEntry:
        """The agent a request names, or the first declaring ``capability``."""
        if target:
            try:
                return self._agents.resolve(target)
            except NotFoundError:
                self._not_serving("agent", target)
                raise
        if not capability:
            raise InvalidArgumentError(
                "name an agent (plugin/agent or a unique agent name) or a capability",
                reason="MISSING_TARGET",
            )
        for entry in self._agents.by_qualified.values():
            if capability in entry.descriptor.capabilities:
                return entry
        known = sorted(
            {c for e in self._agents.by_qualified.values() for c in e.descriptor.capabilities}
        )
        raise NotFoundError(
            f"no agent declares capability {capability!r}; known capabilities: "
            f"{', '.join(known) or 'none'}",
            reason="TARGET_NOT_FOUND",
        )

    def mcp_server(self, server: str) -> str:
        """The plugin bridging MCP server ``server``; ``NOT_FOUND`` otherwise."""
        if server in self._mcp:
            return server
        error = self.not_serving(server)
        if error is not None:
            raise error
        close = difflib.get_close_matches(server, list(self._mcp), n=3, cutoff=0.4)
        known = ", ".join(sorted(self._mcp)) or "none"
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known: {known}"
        raise NotFoundError(f"no MCP server named {server!r}; {hint}", reason="TARGET_NOT_FOUND")

    # -- listing -------------------------------------------------------------

    def tools(self, plugin: str = "", query: str = "") -> list[tool_pb2.ToolDescriptor]:
        """Tool descriptors (with plugin and qualified name), by qualified name."""
        q = query.lower()
        return [
            e.descriptor
            for e in self._tools.by_qualified.values()
            if (not plugin or e.plugin == plugin)
            and (
                not q
                or q in e.name.lower()
                or q in e.descriptor.title.lower()
                or q in e.descriptor.description.lower()
            )
        ]

    def agents(self, plugin: str = "", capability: str = "") -> list[agent_pb2.AgentDescriptor]:
        """Agent descriptors (with plugin and qualified name), by qualified name."""
        return [
            e.descriptor
            for e in self._agents.by_qualified.values()
            if (not plugin or e.plugin == plugin)
            and (not capability or capability in e.descriptor.capabilities)
        ]

    def names_of(self, plugin: str) -> tuple[list[str], list[str]]:
        """Qualified names of ``plugin``'s agents and tools."""
        agents = [e.qualified for e in self._agents_of.get(plugin, [])]
        tools = [e.qualified for e in self._tools_of.get(plugin, [])]
        return agents, tools


def _agent_entry(plugin: str, descriptor: agent_pb2.AgentDescriptor) -> AgentEntry:
    d = agent_pb2.AgentDescriptor()
    d.CopyFrom(descriptor)
    d.plugin = plugin
    d.qualified_name = qualify(plugin, d.name)
    return Entry(plugin, d.name, d.qualified_name, d)


def _tool_entry(plugin: str, descriptor: tool_pb2.ToolDescriptor) -> ToolEntry:
    d = tool_pb2.ToolDescriptor()
    d.CopyFrom(descriptor)
    d.plugin = plugin
    d.qualified_name = qualify(plugin, d.name)
    validator = None
    if d.HasField("input_schema"):
        schema: dict[str, Any] = json_format.MessageToDict(d.input_schema)
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
            validator = cls(schema)
        except jsonschema.SchemaError as exc:
            log.warning(
                "tool %s has an invalid input schema (%s); its arguments reach the plugin "
                "unchecked by the orchestrator",
                d.qualified_name,
                exc.message,
            )
    return ToolEntry(plugin, d.name, d.qualified_name, d, validator)
