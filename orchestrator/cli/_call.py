"""``sidemesh invoke`` and ``sidemesh call``: run an agent or a tool through the mesh."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf import json_format

from clients import AsyncMeshClient, ToolCallResult
from orchestrator.cli._common import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    add_mesh_options,
    print_json,
    run_client,
    to_json,
    usage_error,
)
from sidemesh.core import struct_to_dict
from sidemesh.v1 import agent_pb2, common_pb2

_NOT_STRINGS = {"integer", "number", "boolean", "array", "object", "null"}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``invoke`` and ``call``."""
    p = sub.add_parser(
        "invoke",
        help="run an agent and print its answer as it streams",
        description="Run an agent. Its text streams to stdout; tool calls, progress and logs "
        "go to stderr.",
    )
    p.add_argument("agent", help="plugin/agent, or a unique agent name ('-' with --capability)")
    p.add_argument("text", nargs="*", help="the input text")
    p.add_argument("--data", help="structured input, a JSON object")
    p.add_argument("--capability", default="", help="route to an agent with this capability")
    p.add_argument("--session", default="", help="session/conversation id")
    add_mesh_options(p)
    p.set_defaults(
        run=lambda a: run_client(a, lambda c: _invoke(c, a), traced=f"sidemesh invoke {a.agent}")
    )

    p = sub.add_parser(
        "call",
        help="call a tool and print its result",
        description="Call a tool. Arguments are k=v pairs (v converted to the type the tool's "
        "schema expects), k:=JSON pairs, or a whole JSON object with --json.",
    )
    p.add_argument("tool", help="plugin/tool, or a unique tool name")
    p.add_argument("arguments", nargs="*", metavar="k=v", help="arguments: k=v or k:=JSON")
    p.add_argument("--json", dest="json_arguments", help="the arguments as one JSON object")
    add_mesh_options(p)
    p.set_defaults(
        run=lambda a: run_client(a, lambda c: _call(c, a), traced=f"sidemesh call {a.tool}")
    )


# -- invoke --------------------------------------------------------------------


async def _invoke(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    text = " ".join(args.text)
    agent = "" if args.agent == "-" else args.agent
    data = _json_object(args.data, "--data") if args.data else None
    agent_input = agent_pb2.AgentInput(text=text)
    if data is not None:
        json_format.ParseDict(data, agent_input.data)
    stream = client.invoke(
        agent, agent_input, capability=args.capability, session_id=args.session,
        timeout=args.timeout,
    )  # fmt: skip
    result = agent_pb2.AgentResult()
    mid_line = False  # text written without its line ended yet
    async for event in stream:
        kind = event.WhichOneof("event")
        if args.output == "json":
            print_json(to_json(event), line=True)
        elif kind == "text_delta":
            sys.stdout.write(event.text_delta.text)
            sys.stdout.flush()
            mid_line = not event.text_delta.text.endswith("\n")
        else:
            if mid_line:
                print(flush=True)
                mid_line = False
            if kind == "output":
                print(json.dumps(struct_to_dict(event.output.data), indent=2), flush=True)
            else:
                _note(_describe_agent_event(event, kind))
        if kind == "result":
            result = event.result
    if mid_line:
        print()
    if result.status == agent_pb2.AGENT_RESULT_STATUS_FAILED:
        _note(f"the agent failed: {result.message}")
        return EXIT_TASK_FAILED
    return EXIT_OK


def _describe_agent_event(event: agent_pb2.InvokeResponse, kind: str | None) -> str:
    if kind == "tool_call_started":
        call = event.tool_call_started
        return f"-> {call.tool} {json.dumps(struct_to_dict(call.arguments))}"
    if kind == "tool_call_finished":
        done = event.tool_call_finished
        if done.error_code:
            return f"<- {done.tool} failed: {done.error_message}"
        outcome = ToolCallResult.from_proto(done.result)
        return f"<- {done.tool}{' (error)' if outcome.is_error else ''}: {_short(outcome)}"
    if kind == "progress":
        return _progress(event.progress)
    if kind == "log":
        level = common_pb2.LogLevel.Name(event.log.level).removeprefix("LOG_LEVEL_")
        return f"[{level.lower()}] {event.log.message}"
    if kind == "result":
        status = agent_pb2.AgentResultStatus.Name(event.result.status)
        return f"({status.removeprefix('AGENT_RESULT_STATUS_').lower()})"
    return ""


# -- call ----------------------------------------------------------------------


async def _call(client: AsyncMeshClient, args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {}
    if args.json_arguments:
        arguments.update(_json_object(args.json_arguments, "--json"))
    if args.arguments:
        descriptor = await client.get_tool(args.tool)
        properties = struct_to_dict(descriptor.input_schema).get("properties", {})
        for pair in args.arguments:
            key, value = _parse_pair(pair, properties)
            arguments[key] = value

    async def progress(p: common_pb2.Progress) -> None:
        _note(_progress(p))

    async def log(record: common_pb2.LogRecord) -> None:
        _note(f"[log] {record.message}")

    result = await client.call_tool(
        args.tool, arguments, timeout=args.timeout, on_progress=progress, on_log=log
    )
    if args.output == "json":
        print_json(to_json(result.raw))
    else:
        _print_result(result)
    return EXIT_TASK_FAILED if result.is_error else EXIT_OK


def _parse_pair(pair: str, properties: dict[str, Any]) -> tuple[str, Any]:
    """``k=v`` (typed by the schema) or ``k:=JSON``."""
    key, sep, raw = pair.partition("=")
    if not sep or not key.rstrip(":"):
        raise SystemExit(usage_error(f"argument {pair!r} is not k=v or k:=JSON"))
    if key.endswith(":"):
        return key[:-1], _json_value(raw, key[:-1])
    kind = properties.get(key, {}).get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if kinds & _NOT_STRINGS and "string" not in kinds:
        return key, _json_value(raw, key)
    return key, raw


def _print_result(result: ToolCallResult) -> None:
    out = sys.stderr if result.is_error else sys.stdout
    if result.is_error:
        print("the tool reported an error:", file=out)
    printed = False
    for part in result.content:
        kind = part.WhichOneof("kind")
        if kind == "text":
            print(part.text, file=out)
        elif kind == "json":
            print(json.dumps(json_format.MessageToDict(part.json), indent=2), file=out)
        elif kind == "blob":
            print(f"<{len(part.blob.data)} bytes of {part.blob.mime_type}>", file=out)
        elif kind == "resource_link":
            print(f"<resource {part.resource_link.uri}>", file=out)
        elif kind == "resource":
            print(part.resource.text or f"<resource {part.resource.uri}>", file=out)
        printed = True
    if not printed and result.structured is not None:
        print(json.dumps(result.structured, indent=2), file=out)


# -- helpers -------------------------------------------------------------------


def _progress(p: common_pb2.Progress) -> str:
    total = f"/{p.total:g}" if p.HasField("total") else ""
    return f"[{p.progress:g}{total}] {p.message}".rstrip()


def _short(result: ToolCallResult) -> str:
    text = result.text or json.dumps(result.structured)
    return text if len(text) <= 80 else text[:77] + "..."


def _note(line: str) -> None:
    if line:
        print(line, file=sys.stderr, flush=True)


def _json_object(text: str, option: str) -> dict[str, Any]:
    value = _json_value(text, option)
    if not isinstance(value, dict):
        raise SystemExit(usage_error(f"{option} must be a JSON object, like '{{\"a\": 1}}'"))
    return value


def _json_value(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SystemExit(usage_error(f"{where}: not valid JSON ({exc}): {text!r}")) from None
