"""``sidemesh resources | read | prompts | prompt``: the MCP servers' resources and prompts."""

from __future__ import annotations

import argparse
import base64
import sys

from clients import AsyncMeshClient
from orchestrator.cli._common import (
    EXIT_OK,
    add_mesh_options,
    print_json,
    run_client,
    to_json,
    usage_error,
)
from orchestrator.cli._inspect import table
from sidemesh.core import NotFoundError
from sidemesh.v1 import common_pb2, mcp_pb2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers the MCP resource and prompt commands."""
    p = sub.add_parser("resources", help="list the MCP servers' resources and resource templates")
    p.add_argument("server", nargs="?", default="", help="only this MCP plugin's")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _resources(c, a)))

    p = sub.add_parser("read", help="read a resource of an MCP server by URI")
    p.add_argument("target", help="SERVER URI, or just URI to ask every MCP server", nargs="+")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _read(c, a)))

    p = sub.add_parser("prompts", help="list the MCP servers' prompts")
    p.add_argument("server", nargs="?", default="", help="only this MCP plugin's")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _prompts(c, a)))

    p = sub.add_parser("prompt", help="render a prompt: sidemesh prompt SERVER/PROMPT k=v ...")
    p.add_argument("prompt", help="SERVER/PROMPT, e.g. mcp-everything/simple-prompt")
    p.add_argument("arguments", nargs="*", help="argument values as key=value")
    add_mesh_options(p)
    p.set_defaults(run=lambda a: run_client(a, lambda c: _prompt(c, a)))


async def _servers(client: AsyncMeshClient, server: str) -> list[str]:
    return [server] if server else await client.list_mcp_servers()


async def _resources(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    listed: list[tuple[str, mcp_pb2.Resource | mcp_pb2.ResourceTemplate]] = []
    for server in await _servers(client, args.server):
        info = await client.mcp_server_info(server)
        if not info.capabilities.resources:
            continue
        listed += [(server, r) for r in await client.list_resources(server)]
        listed += [(server, t) for t in await client.list_resource_templates(server)]
    if args.output == "json":
        print_json([{"server": s, **to_json(r)} for s, r in listed])
        return EXIT_OK
    rows = []
    for server, r in listed:
        uri = r.uri if isinstance(r, mcp_pb2.Resource) else r.uri_template
        rows.append([server, uri, r.name, r.mime_type or "-", (r.description or "")[:60]])
    print(table(rows, ["SERVER", "URI", "NAME", "TYPE", "DESCRIPTION"]))
    return EXIT_OK


async def _read(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    if len(args.target) > 2:
        return usage_error("give SERVER URI, or URI")
    server, uri = args.target if len(args.target) == 2 else ("", args.target[0])
    contents: list[common_pb2.ResourceContents] | None = None
    for candidate in await _servers(client, server):
        try:
            contents = await client.read_resource(candidate, uri)
            break
        except NotFoundError:
            if server:
                raise
    if contents is None:
        raise NotFoundError(f"no MCP server of the mesh has the resource {uri!r}")
    if args.output == "json":
        print_json([to_json(c) for c in contents])
        return EXIT_OK
    for part in contents:
        if part.WhichOneof("contents") == "blob":
            if sys.stdout.isatty():
                print(f"[{len(part.blob)} bytes of {part.mime_type or 'binary data'}]")
            else:
                sys.stdout.buffer.write(part.blob)
        else:
            print(part.text)
    return EXIT_OK


async def _prompts(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    listed: list[tuple[str, mcp_pb2.Prompt]] = []
    for server in await _servers(client, args.server):
        info = await client.mcp_server_info(server)
        if info.capabilities.prompts:
            listed += [(server, p) for p in await client.list_prompts(server)]
    if args.output == "json":
        print_json([{"server": s, **to_json(p)} for s, p in listed])
        return EXIT_OK
    rows = []
    for server, p in listed:
        arguments = " ".join(a.name + ("" if a.required else "?") for a in p.arguments)
        rows.append([f"{server}/{p.name}", arguments or "-", (p.description or "")[:60]])
    print(table(rows, ["PROMPT", "ARGUMENTS", "DESCRIPTION"]))
    return EXIT_OK


async def _prompt(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    server, _, name = args.prompt.partition("/")
    if not server or not name:
        return usage_error("name the prompt as SERVER/PROMPT, e.g. mcp-everything/simple-prompt")
    values: dict[str, str] = {}
    for pair in args.arguments:
        key, sep, value = pair.partition("=")
        if not sep:
            return usage_error(f"arguments are key=value, not {pair!r}")
        values[key] = value
    result = await client.get_prompt(server, name, values)
    if args.output == "json":
        print_json(to_json(result))
        return EXIT_OK
    if result.description:
        print(f"# {result.description}")
    for message in result.messages:
        role = mcp_pb2.PromptRole.Name(message.role).removeprefix("PROMPT_ROLE_").lower()
        content = message.content
        kind = content.WhichOneof("kind")
        if kind == "text":
            body = content.text
        elif kind == "resource":
            body = content.resource.text or f"[{content.resource.uri}]"
        elif kind == "blob":
            body = f"[{len(content.blob.data)} bytes, {content.blob.mime_type}; base64 "
            body += base64.b64encode(content.blob.data[:24]).decode() + "...]"
        else:
            body = str(to_json(content))
        print(f"{role}: {body}")
    return EXIT_OK
