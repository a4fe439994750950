"""What one MCP endpoint shows: the whole mesh, or a virtual server's part of it, per principal.

A :class:`View` decides, by mesh name (``plugin/tool``, ``plugin/prompt``,
``plugin/URI``), whether a tool, agent, prompt or resource is in the
endpoint, under which MCP name and with which description. The principal's
policy (an :class:`~orchestrator.gateway._auth.Authorizer`) is asked on
top: what it may not call it does not see.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field

from orchestrator._mcp_config import VirtualServer

#: MCP's limit on tool and prompt names, and the prefix that marks an agent.
MAX_NAME, AGENT_PREFIX = 128, "agent_"
#: Hex digits of the hash that ends a shortened name.
_HASH_DIGITS = 10


def mcp_name(qualified: str, *, agent: bool = False) -> str:
    """The default MCP name of a mesh tool, prompt or agent ``plugin/name``.

    MCP names are 1-128 characters of ``[A-Za-z0-9_.-]``, so ``/`` cannot stay:
    ``plugin/tool`` is ``plugin.tool`` (plugin names have no dot, so the first
    dot splits it back); an agent is ``agent_plugin.agent`` (a plugin name
    never holds ``_``); a name longer than 128 characters keeps its first 117
    and ends with ``-`` and 10 hex digits of its SHA-256.
    """
    plugin, _, name = qualified.partition("/")
    full = f"{AGENT_PREFIX if agent else ''}{plugin}.{name}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_DIGITS]
    return f"{full[: MAX_NAME - _HASH_DIGITS - 1]}-{digest}"


def _matches(patterns: list[str] | None, name: str) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class View:
    """The whole mesh (``server=None``) or one virtual server."""

    name: str = "sidemesh"
    server: VirtualServer | None = None
    _principals: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, name: str, server: VirtualServer) -> View:
        """The view of virtual server ``name``."""
        return cls(name, server, list(server.principals))

    @property
    def title(self) -> str | None:
        return self.server.title if self.server is not None else None

    def admits(self, principal: str) -> bool:
        """Whether ``principal`` may use this endpoint at all (the virtual server's binding)."""
        return not self._principals or any(
            fnmatch.fnmatchcase(principal, p) for p in self._principals
        )

    def tool(self, qualified: str) -> bool:
        """Whether the tool or agent ``plugin/name`` is in this view."""
        return _matches(self.server.tools if self.server else None, qualified)

    def prompt(self, qualified: str) -> bool:
        """Whether the prompt ``plugin/prompt`` is in this view."""
        return _matches(self.server.prompts if self.server else None, qualified)

    def resource(self, plugin: str, uri: str) -> bool:
        """Whether the resource (or template) ``uri`` of ``plugin`` is in this view."""
        return _matches(self.server.resources if self.server else None, f"{plugin}/{uri}")

    def rename(self, qualified: str, *, agent: bool = False) -> str:
        """The MCP name of ``plugin/name`` here."""
        if self.server is not None and qualified in self.server.rename:
            return self.server.rename[qualified]
        return mcp_name(qualified, agent=agent)

    def description(self, key: str, default: str | None) -> str | None:
        """The description of ``key`` (a mesh name or ``plugin/URI``) here."""
        if self.server is not None and key in self.server.descriptions:
            return self.server.descriptions[key]
        return default
