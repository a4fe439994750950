"""The gateway's catalog: the mesh's tools, agents, prompts and resources, as one MCP server.

Tools and agents come from the mesh's catalog (``MeshService``); prompts,
resources and templates from each MCP plugin (``McpService``), read when a
client lists them. A :class:`~orchestrator.gateway._view.View` and the
principal's :class:`~orchestrator.gateway._auth.Authorizer` filter all of it.

Resources keep their URIs (clients and models know them); a read goes to the
plugin that listed the URI, else to the plugins whose templates match it,
else to every MCP plugin in turn.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import mcp_types as types

from clients import AsyncMeshClient
from orchestrator.gateway import _convert as convert
from orchestrator.gateway._auth import Authorizer
from orchestrator.gateway._view import View
from sidemesh.core import SidemeshError, struct_to_dict
from sidemesh.v1 import agent_pb2

log = logging.getLogger("sidemesh.mcp")

AGENT_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "The input for the agent, in words"},
        "data": {"type": "object", "description": "Optional structured input for the agent"},
    },
    "required": ["text"],
    "additionalProperties": False,
}


#: Every tool and agent may be called as a task (2025-11-25 clients; ``_tasks``).
TASKS_OPTIONAL = types.ToolExecution(task_support="optional")


@dataclass(frozen=True, slots=True)
class Target:
    """What an MCP tool name calls in the mesh."""

    qualified: str
    agent: bool
    tool: types.Tool
    #: The tool's plugin is an MCP server: calls go through ``CallToolInteractive``.
    mcp: bool = False
    #: The input schema, for the gateway's own argument check (``None``: nothing to check).
    schema: dict[str, Any] | None = None

    @property
    def plugin(self) -> str:
        return self.qualified.partition("/")[0]

    @property
    def local_name(self) -> str:
        return self.qualified.partition("/")[2]


@dataclass(frozen=True, slots=True)
class PromptTarget:
    """What an MCP prompt name renders in the mesh."""

    server: str
    name: str
    prompt: types.Prompt


def tool_targets(
    tools: Iterable[Any],
    agents: Iterable[agent_pb2.AgentDescriptor],
    mcp_plugins: set[str],
    view: View,
) -> dict[str, Target]:
    """The MCP tools of the mesh's tool and agent descriptors in ``view``, by MCP name."""
    targets: dict[str, Target] = {}
    for d in tools:
        if not view.tool(d.qualified_name):
            continue
        name = view.rename(d.qualified_name)
        schema = struct_to_dict(d.input_schema) if d.HasField("input_schema") else {}
        hints = d.annotations
        tool = types.Tool(
            name=name,
            title=d.title or None,
            description=view.description(
                d.qualified_name, d.description or f"Tool {d.qualified_name} of the Sidemesh mesh"
            ),
            input_schema=schema or {"type": "object"},
            output_schema=struct_to_dict(d.output_schema) if d.HasField("output_schema") else None,
            execution=TASKS_OPTIONAL,
            annotations=types.ToolAnnotations(
                read_only_hint=hints.read_only if hints.HasField("read_only") else None,
                idempotent_hint=hints.idempotent if hints.HasField("idempotent") else None,
                destructive_hint=hints.destructive if hints.HasField("destructive") else None,
                open_world_hint=hints.open_world if hints.HasField("open_world") else None,
            )
            if d.HasField("annotations")
            else None,
        )
        targets[name] = Target(d.qualified_name, False, tool, d.plugin in mcp_plugins, schema)
    for a in agents:
        if not view.tool(a.qualified_name):
            continue
        name = view.rename(a.qualified_name, agent=True)
        about = a.description or "an agent of the Sidemesh mesh"
        tool = types.Tool(
            name=name,
            description=view.description(a.qualified_name, f"Agent {a.qualified_name}: {about}"),
            input_schema=AGENT_INPUT_SCHEMA,
            execution=TASKS_OPTIONAL,
        )
        targets[name] = Target(a.qualified_name, True, tool, False, AGENT_INPUT_SCHEMA)
    return dict(sorted(targets.items()))


def template_pattern(template: str) -> re.Pattern[str]:
    """A regular expression matching the URIs of an RFC 6570 template (any value per variable)."""
    parts = re.split(r"(\{[^}]*\})", template)
    regex = "".join(
        ("(?:[?&#].*)?" if p[1:2] in "?&#" else ".+") if p.startswith("{") else re.escape(p)
        for p in parts
        if p
    )
    return re.compile(f"^{regex}$")


class GatewayCatalog:
    """The tools, prompts and resources of one view, refreshed from the mesh."""

    def __init__(self, mesh: AsyncMeshClient, view: View, authorizer: Authorizer) -> None:
        self._mesh = mesh
        self.view = view
        self._authorizer = authorizer
        #: MCP tool name -> target, as of the last refresh.
        self.targets: dict[str, Target] = {}
        #: The MCP plugins of the mesh, as of the last refresh.
        self.mcp_servers: list[str] = []
        self.prompts: dict[str, PromptTarget] = {}
        #: Resource URI -> the plugin that listed it; template -> plugin.
        self._resource_owner: dict[str, str] = {}
        self._templates: dict[str, tuple[str, re.Pattern[str]]] = {}

    # -- tools -------------------------------------------------------------------------

    async def refresh_tools(self) -> None:
        """Reads the mesh's tools, agents and MCP plugins."""
        tools, agents, plugins = await asyncio.gather(
            self._mesh.list_tools(), self._mesh.list_agents(), self._mesh.list_plugins()
        )
        self.mcp_servers = sorted(p.name for p in plugins if p.mcp and p.replicas)
        self.targets = tool_targets(tools, agents, set(self.mcp_servers), self.view)

    async def ensure_servers(self) -> None:
        """Reads the mesh's catalog once, if nothing was listed yet (a read came first)."""
        if not self.mcp_servers:
            await self.refresh_tools()

    def visible_tools(self, principal: str) -> list[types.Tool]:
        """The tools ``principal`` may call."""
        return [t.tool for t in self.targets.values() if self.may_call(principal, t)]

    def may_call(self, principal: str, target: Target) -> bool:
        return self._authorizer.may(
            principal, "agent" if target.agent else "tool", target.qualified
        )

    def may_use_server(self, principal: str, server: str) -> bool:
        return self._authorizer.may(principal, "mcp", server)

    # -- prompts -----------------------------------------------------------------------

    async def refresh_prompts(self, principal: str) -> list[types.Prompt]:
        """Every prompt of the MCP plugins ``principal`` may use, under its MCP name."""
        prompts: dict[str, PromptTarget] = {}
        for server, listed in await self._each_server(principal, self._mesh.list_prompts):
            for p in listed:
                qualified = f"{server}/{p.name}"
                if not self.view.prompt(qualified):
                    continue
                name = self.view.rename(qualified)
                description = self.view.description(qualified, p.description or None)
                prompts[name] = PromptTarget(server, p.name, convert.prompt(p, name, description))
        self.prompts = dict(sorted(prompts.items()))
        return [p.prompt for p in self.prompts.values()]

    async def prompt(self, name: str, principal: str) -> PromptTarget | None:
        """The prompt of MCP name ``name``, reading the prompts again if it is not known."""
        if name not in self.prompts:
            await self.refresh_prompts(principal)
        target = self.prompts.get(name)
        if target is None or not self.may_use_server(principal, target.server):
            return None
        return target

    # -- resources ---------------------------------------------------------------------

    async def list_resources(self, principal: str) -> list[types.Resource]:
        """Every resource of the MCP plugins ``principal`` may use."""
        out: list[types.Resource] = []
        for server, listed in await self._each_server(principal, self._mesh.list_resources):
            for r in listed:
                if not self.view.resource(server, r.uri):
                    continue
                self._resource_owner.setdefault(r.uri, server)
                description = self.view.description(f"{server}/{r.uri}", r.description or None)
                out.append(convert.resource(r, description))
        return out

    async def list_templates(self, principal: str) -> list[types.ResourceTemplate]:
        """Every resource template of the MCP plugins ``principal`` may use."""
        out: list[types.ResourceTemplate] = []
        fetch = self._mesh.list_resource_templates
        for server, listed in await self._each_server(principal, fetch):
            for t in listed:
                if not self.view.resource(server, t.uri_template):
                    continue
                self._templates[t.uri_template] = (server, template_pattern(t.uri_template))
                key = f"{server}/{t.uri_template}"
                out.append(convert.resource_template(t, self.view.description(key, None)))
        return out

    def template_server(self, template: str) -> str | None:
        """The plugin that offers resource template ``template``, when listed."""
        found = self._templates.get(template)
        return found[0] if found else None

    async def resource_owner(self, uri: str, principal: str) -> str | None:
        """The plugin that lists ``uri`` (or a template matching it), listing them if need be."""
        if uri not in self._resource_owner and not self._matching_templates(uri):
            await self.list_resources(principal)
            await self.list_templates(principal)
        owner = self._resource_owner.get(uri)
        if owner is None:
            matched = self._matching_templates(uri)
            owner = matched[0] if matched else None
        if owner is None or not self.may_use_server(principal, owner):
            return None
        return owner

    def _matching_templates(self, uri: str) -> list[str]:
        return [s for s, pattern in self._templates.values() if pattern.match(uri)]

    def resource_candidates(self, uri: str, principal: str) -> list[str]:
        """The plugins to ask for ``uri``, most likely first: the one that listed it, those
        whose (listed, so in this view) templates match it, then the others in this view."""
        owner = [self._resource_owner[uri]] if uri in self._resource_owner else []
        matched = self._matching_templates(uri)
        others = [s for s in self.mcp_servers if self.view.resource(s, uri)]
        ordered = dict.fromkeys([*owner, *matched, *others])
        return [s for s in ordered if self.may_use_server(principal, s)]

    # -- internals ---------------------------------------------------------------------

    async def _each_server(self, principal: str, fetch: Any) -> list[tuple[str, list[Any]]]:
        """``fetch(server)`` for every MCP plugin ``principal`` may use (failures logged)."""
        await self.ensure_servers()
        servers = [s for s in self.mcp_servers if self.may_use_server(principal, s)]
        results = await asyncio.gather(*(fetch(s) for s in servers), return_exceptions=True)
        out: list[tuple[str, list[Any]]] = []
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, SidemeshError):
                if result.code.name not in ("UNIMPLEMENTED",):
                    log.warning("MCP server %s: %s", server, result)
                continue
            if isinstance(result, BaseException):
                raise result
            out.append((server, list(result)))
        return out
