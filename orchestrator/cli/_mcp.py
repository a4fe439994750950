"""``sidemesh mcp``: the mesh as an MCP server over stdio, for MCP clients such as IDEs.

The server is :class:`orchestrator.gateway.MeshMcpServer`: every tool and
agent of the mesh, every MCP plugin's resources and prompts, or with
``--server NAME`` one virtual server of the config (``mcp.servers``). Calls go
through the mesh with ``clients.AsyncMeshClient``. Stdout is the protocol:
logs go to stderr. The stdio client is the local user, ``unix:uid:<uid>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from orchestrator._config import load_config
from orchestrator._yaml_models import ConfigError
from orchestrator.cli._common import add_mesh_options, mesh_address, mesh_client, usage_error
from sidemesh.core import run_loop

if TYPE_CHECKING:  # the gateway (and the MCP SDK) load only when the command runs
    from orchestrator.gateway import MeshMcpServer, View

log = logging.getLogger("sidemesh.mcp")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``mcp``."""
    p = sub.add_parser(
        "mcp",
        help="serve the mesh's tools, agents, resources and prompts to an MCP client, over stdio",
        description="Serve the mesh as an MCP server on stdin/stdout, for MCP clients such as "
        "IDEs: tools as plugin.tool, agents as agent_plugin.agent, prompts as plugin.prompt, "
        "resources by their URIs. Logs go to stderr.",
    )
    add_mesh_options(p)
    p.add_argument(
        "--server",
        "-s",
        metavar="NAME",
        help="serve the virtual MCP server NAME of the config (mcp.servers) instead of the mesh",
    )
    p.set_defaults(run=_run)


def _view(args: argparse.Namespace) -> View:
    from orchestrator.gateway import View

    if not args.server:
        return View()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(usage_error(str(exc))) from None
    server = config.mcp.servers.get(args.server)
    if server is None:
        known = ", ".join(sorted(config.mcp.servers)) or "none"
        raise SystemExit(usage_error(f"no virtual MCP server {args.server!r} (known: {known})"))
    return View.of(args.server, server)


async def serve_stdio(server: MeshMcpServer) -> None:
    """Serves MCP on stdin/stdout until the client closes it."""
    from orchestrator.gateway import stdio_streams

    follow = asyncio.create_task(server.follow_catalog())
    try:
        async with stdio_streams() as (read, write):
            await server.server.run(read, write, server.initialization_options())
    finally:
        follow.cancel()


def _run(args: argparse.Namespace) -> int:
    from orchestrator.gateway import MeshMcpServer

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    address = mesh_address(args)
    view = _view(args)
    client = mesh_client(args, address)
    log.info("serving %s at %s over MCP on stdio (%s)", view.name, address,
             client.credentials.describe())  # fmt: skip

    async def main() -> None:
        async with client as mesh:
            server = MeshMcpServer(mesh, view, principal=f"unix:uid:{os.getuid()}")
            await serve_stdio(server)

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main())
    return 0
