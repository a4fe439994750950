"""The bridge's instructions: which MCP server to run and how (``$SIDEMESH_MCP_SERVER``).

The orchestrator writes the manifest's ``mcp:`` section there as JSON. The
sidecar cannot import the orchestrator (the sandbox shows it only the runtime
packages), so it reads the JSON itself; unknown keys are ignored, so that a
newer orchestrator can add some.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from sidemesh.core import SidecarEnv

SERVER_ENV = SidecarEnv.MCP_SERVER
#: The seconds the orchestrator gives the sidecar to become ready.
STARTUP_ENV = SidecarEnv.STARTUP_TIMEOUT
#: ``PluginInfo.runtime`` of every bridged plugin.
RUNTIME = "sidemesh-mcp-bridge/0.1.0"
#: The longest the MCP server may take to answer its first request. The
#: orchestrator's default startup timeout is 30 s: the bridge gives up first, so
#: the plugin's error is the bridge's message, not a bare timeout.
MAX_STARTUP_TIMEOUT = 20.0


class SpecError(ValueError):
    """``$SIDEMESH_MCP_SERVER`` is missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class ServerSpec:
    """How to run the MCP server: the manifest's ``mcp:`` section."""

    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    transport: str = "stdio"
    url: str = ""
    #: Seconds a request may take when the gRPC caller sets no deadline.
    request_timeout: float = 30.0

    @property
    def startup_timeout(self) -> float:
        """Seconds the server gets to answer its first request (the probe or ``initialize``).

        A request's timeout, within most of the plugin's startup budget
        (``$SIDEMESH_STARTUP_TIMEOUT``): the bridge gives up before the orchestrator
        does, so the plugin's error is the bridge's clear message.
        """
        try:
            budget = float(os.environ.get(STARTUP_ENV, "0"))
        except ValueError:
            budget = 0.0
        limit = max(1.0, budget * 0.8) if budget > 0 else MAX_STARTUP_TIMEOUT
        return min(self.request_timeout, limit)

    @property
    def display(self) -> str:
        """The command line, for messages."""
        return " ".join([self.command, *self.args])

    @classmethod
    def from_json(cls, text: str) -> ServerSpec:
        """Parses the JSON the orchestrator wrote; raises ``SpecError``."""
        try:
            data: Any = json.loads(text)
        except ValueError as exc:
            raise SpecError(f"{SERVER_ENV} is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("command"), str):
            raise SpecError(f"{SERVER_ENV} must be an object with a 'command' string")
        args, env = data.get("args") or [], data.get("env") or {}
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise SpecError(f"{SERVER_ENV}: 'args' must be a list of strings")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise SpecError(f"{SERVER_ENV}: 'env' must map names to strings")
        transport = data.get("transport") or "stdio"
        if transport not in ("stdio", "streamable-http"):
            raise SpecError(
                f"{SERVER_ENV}: transport {transport!r} is not stdio or streamable-http"
            )
        url = data.get("url") or ""
        if transport == "streamable-http" and not url:
            raise SpecError(f"{SERVER_ENV}: transport streamable-http needs 'url'")
        timeout = data.get("request_timeout", 30.0)
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise SpecError(f"{SERVER_ENV}: 'request_timeout' must be a positive number")
        return cls(
            command=data["command"],
            args=tuple(args),
            env=dict(env),
            transport=transport,
            url=url,
            request_timeout=float(timeout),
        )

    @classmethod
    def from_environment(cls) -> ServerSpec:
        """The spec in ``$SIDEMESH_MCP_SERVER``; raises ``SpecError``."""
        text = os.environ.get(SERVER_ENV, "")
        if not text:
            raise SpecError(
                f"{SERVER_ENV} is not set: the orchestrator sets it from the manifest's 'mcp' "
                "section (runtime: mcp)"
            )
        return cls.from_json(text)
