"""The data plane's test rig: real grpc.aio upstreams serving the ``sidemesh.v1`` services,
an internal grpc.aio server, a small Python decision, and a ``DataPlane`` in front of them.

Run as a script (``python dataplanekit.py unix:/path``), it serves one upstream in its own
process, for the tests that kill an upstream mid-call.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from clients import NotFoundError, ResourceExhaustedError, UnavailableError
from sidemesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    mcp_pb2,
    mcp_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    tool_pb2,
    tool_pb2_grpc,
)

WAIT = 5.0

ROUTES = [
    ("/sidemesh.v1.ToolService/CallTool", "unary_stream"),
    ("/sidemesh.v1.AgentService/Invoke", "unary_stream"),
    ("/sidemesh.v1.AgentService/Chat", "stream_stream"),
    ("/sidemesh.v1.McpService/GetServerInfo", "unary_unary"),
]


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    json_format.ParseDict(data, out)
    return out


def text_result(text: str) -> tool_pb2.CallToolResponse:
    return tool_pb2.CallToolResponse(
        result=tool_pb2.ToolResult(content=[common_pb2.Content(text=text)])
    )


def rich_status(code: grpc.StatusCode, message: str, reason: str) -> bytes:
    """An encoded google.rpc.Status with an ErrorInfo, as the mesh's errors carry."""
    from clients import SidemeshError

    class _E(SidemeshError):
        pass

    _E.code = code
    return _E(message, reason=reason).to_status_proto().SerializeToString()


def call_tool(tool: str, **arguments: object) -> tool_pb2.CallToolRequest:
    return tool_pb2.CallToolRequest(tool=tool, arguments=struct(dict(arguments)))


async def results(
    stub: tool_pb2_grpc.ToolServiceStub, request: tool_pb2.CallToolRequest, **kwargs: Any
) -> list[tool_pb2.CallToolResponse]:
    return [r async for r in stub.CallTool(request, **kwargs)]


# -- upstreams -------------------------------------------------------------------


class Upstream:
    """A grpc.aio server playing a sidecar: ToolService, AgentService, McpService.

    Tools (by plugin-local name): ``echo`` (the ``payload`` argument back, one result),
    ``slow`` (sleeps ``delay`` times ``slowness`` s, then a result), ``progress`` (``count``
    progress events, then a result), ``fail`` (aborts with ``code``/``message``, rich
    details and a custom trailer), ``fail_after_progress`` (one progress, then
    UNAVAILABLE), ``big`` (a result of ``size`` bytes), ``meta`` (sends initial and
    trailing metadata).
    """

    def __init__(self, name: str, address: str, slowness: float = 1.0) -> None:
        self.name = name
        self.address = address
        self.slowness = slowness
        self.calls = 0
        self.yielded = 0
        self.metadata: list[dict[str, Any]] = []
        self.time_remaining: list[float | None] = []
        self.requests: list[Any] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.server: grpc.aio.Server | None = None

    def see(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls += 1
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        self.time_remaining.append(context.time_remaining())

    async def start(self) -> str:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        tool_pb2_grpc.add_ToolServiceServicer_to_server(_Tools(self), self.server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(_Agents(self), self.server)
        mcp_pb2_grpc.add_McpServiceServicer_to_server(_Mcp(self), self.server)
        port = self.server.add_insecure_port(self.address)
        if not self.address.startswith("unix:"):
            self.address = f"127.0.0.1:{port}"
        await self.server.start()
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


class _Tools(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self, up: Upstream) -> None:
        self.up = up

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tool_pb2.CallToolResponse]:
        up = self.up
        up.see(request, context)
        args = json_format.MessageToDict(request.arguments)
        tool = request.tool
        up.started.set()
        try:
            if tool == "echo":
                yield text_result(f"{up.name}:{args.get('payload', '')}")
            elif tool == "slow":
                await asyncio.sleep(float(args.get("delay", 1)) * up.slowness)
                yield text_result(f"{up.name}:slept")
            elif tool == "progress":
                for i in range(int(args.get("count", 3))):
                    yield tool_pb2.CallToolResponse(progress=common_pb2.Progress(progress=i))
                    await asyncio.sleep(float(args.get("delay", 0)))
                yield text_result(f"{up.name}:done")
            elif tool == "fail":
                code = grpc.StatusCode[args.get("code", "FAILED_PRECONDITION")]
                details = rich_status(code, args.get("message", "it failed"), "PLUGIN_REASON")
                await context.abort(
                    code,
                    args.get("message", "it failed"),
                    (("grpc-status-details-bin", details), ("x-plugin-trailer", "t1")),
                )
            elif tool == "fail_after_progress":
                yield tool_pb2.CallToolResponse(progress=common_pb2.Progress(progress=1))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "flaked after a message")
            elif tool == "big":
                yield text_result("x" * int(args.get("size", 100)))
            elif tool == "meta":
                await context.send_initial_metadata((("x-initial", "i1"),))
                context.set_trailing_metadata(
                    (("x-trailing", "t2"), ("x-trailing-bin", b"\x00\x01"))
                )
                yield text_result(f"{up.name}:meta")
            else:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{up.name} has no tool {tool}")
        except asyncio.CancelledError:
            up.cancelled.set()
            raise


class _Agents(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, up: Upstream) -> None:
        self.up = up

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeResponse]:
        self.up.see(request, context)
        data = json_format.MessageToDict(request.input.data)
        count, size, delay = (
            int(data.get("count", 3)),
            int(data.get("size", 8)),
            float(data.get("delay", 0)),
        )
        self.up.started.set()
        try:
            for i in range(count):
                if i and delay:
                    await asyncio.sleep(delay)
                yield agent_pb2.InvokeResponse(text_delta=agent_pb2.TextDelta(text="x" * size))
                self.up.yielded += 1
            yield agent_pb2.InvokeResponse(
                result=agent_pb2.AgentResult(status=agent_pb2.AGENT_RESULT_STATUS_COMPLETED)
            )
        except asyncio.CancelledError:
            self.up.cancelled.set()
            raise

    async def Chat(
        self,
        requests: AsyncIterator[agent_pb2.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        self.up.see(None, context)
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind == "start":
                text = f"started {request.start.agent}"
            else:
                text = f"{self.up.name} heard {request.input.text}"
            yield agent_pb2.ChatResponse(text_delta=agent_pb2.TextDelta(text=text))


class _Mcp(mcp_pb2_grpc.McpServiceServicer):
    def __init__(self, up: Upstream) -> None:
        self.up = up

    async def GetServerInfo(
        self, request: mcp_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mcp_pb2.GetServerInfoResponse:
        self.up.see(request, context)
        return mcp_pb2.GetServerInfoResponse(
            info=mcp_pb2.McpServerInfo(name=f"{self.up.name}:{request.server}")
        )


# -- the internal server ---------------------------------------------------------


class Internal(mesh_pb2_grpc.MeshServiceServicer):
    """The orchestrator's own server behind the data plane: records what it was told."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.metadata: list[dict[str, Any]] = []
        self.server: grpc.aio.Server | None = None

    async def ListPlugins(
        self, request: mesh_pb2.ListPluginsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.ListPluginsResponse:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        return mesh_pb2.ListPluginsResponse()

    async def start(self) -> None:
        self.server = grpc.aio.server()
        mesh_pb2_grpc.add_MeshServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(self.address)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


# -- the decision ----------------------------------------------------------------


def _string_field(number: int, value: str) -> bytes:
    raw = value.encode()
    return bytes([number << 3 | 2, len(raw)]) + raw


class Decider:
    """A small control plane: tools are named ``replica/tool``; the rewritten request
    names the plugin-local tool, as the router's resolvers do."""

    def __init__(self) -> None:
        import sidemesh_dataplane as dp

        self.dp = dp
        self.calls: list[Any] = []
        self.policy = dp.RetryPolicy()
        self.span_attributes: Any = None
        self.retry_picks: list[tuple[Any, str, str]] = []
        self.next_replica: Callable[[str], str | None] = lambda failed: None
        self.failures: list[tuple[Any, str, str]] = []
        self.peers: list[tuple[str, int, int]] = []
        self.allow_peer = True

    def decide(self, call: Any) -> Any:
        self.calls.append(call)
        dp = self.dp
        if call.path == "/sidemesh.v1.ToolService/CallTool":
            if call.message is None:
                return dp.Refusal(3, "no request")
            request = tool_pb2.CallToolRequest.FromString(call.message)
            replica, _, tool = request.tool.partition("/")
            if replica == "missing":
                err = NotFoundError(f"no tool named {request.tool!r}", reason="TARGET_NOT_FOUND")
                return dp.Refusal(5, err.message, err.to_status_proto().SerializeToString())
            context = {"tool": request.tool, "replica": replica}
            return dp.Decision(
                replica,
                message=call.message + _string_field(1, tool),
                metadata=[("x-routed-by", "test"), ("x-decider-bin", b"\x01\x02")],
                context=context,
                retry=self.policy,
                span_attributes=self.span_attributes,
            )
        if call.path == "/sidemesh.v1.AgentService/Invoke":
            request = agent_pb2.InvokeRequest.FromString(call.message)
            return dp.Decision(request.agent, context={"agent": request.agent}, retry=self.policy)
        if call.path == "/sidemesh.v1.AgentService/Chat":
            if call.message is None:
                return dp.Refusal(3, "the chat ended before its first message (ChatRequest.start)")
            request = agent_pb2.ChatRequest.FromString(call.message)
            return dp.Decision(
                request.start.agent, context={"chat": request.start.agent}, retry=self.policy
            )
        request = mcp_pb2.GetServerInfoRequest.FromString(call.message)
        return dp.Decision(request.server, context={"mcp": request.server}, retry=self.policy)

    def retry_pick(self, context: Any, failed: str, reason: str) -> str | None:
        self.retry_picks.append((context, failed, reason))
        return self.next_replica(failed)

    def upstream_failed(
        self, context: Any, replica: str, detail: str
    ) -> tuple[int, str, bytes | None]:
        self.failures.append((context, replica, detail))
        err = UnavailableError(
            f"plugin 'test' replica {replica} exited during the call ({detail}); "
            "the call did not complete. The replica is being restarted: retry",
            reason="SIDECAR_UNAVAILABLE",
            metadata={"plugin": "test", "replica": replica},
            retry_delay=1.0,
        )
        return err.code.value[0], err.message, err.to_status_proto().SerializeToString()

    def verify_peer(self, replica: str, pid: int, uid: int) -> bool:
        self.peers.append((replica, pid, uid))
        return self.allow_peer


ADMISSION = ResourceExhaustedError(
    "the mesh is at its limit of 2 concurrent calls; retry shortly "
    "(operators: raise limits.max_concurrent_calls)",
    reason="CONCURRENCY_LIMIT",
    retry_delay=0.1,
)


def make_dataplane(decider: Decider, internal: str | None, **options: Any) -> Any:
    import sidemesh_dataplane as dp

    options.setdefault("routes", ROUTES)
    return dp.DataPlane(
        decider.decide,
        upstream_failed=decider.upstream_failed,
        retry_pick=decider.retry_pick,
        verify_peer=decider.verify_peer,
        internal_address=internal,
        **options,
    )


async def wait_records(plane: Any, count: int = 1, timeout: float = WAIT) -> list[Any]:
    """The next ``count`` records (they are pushed just after the client's trailers)."""
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        found += plane.take_records()
        if len(found) < count:
            await asyncio.sleep(0.01)
    assert len(found) >= count, f"expected {count} records, got {found}"
    return found


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))


def status_of(trailers: Any) -> status_pb2.Status | None:
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


@dataclass
class Mesh:
    """A data plane listening on TCP (``tcp``), Unix (``unix``) and a callback socket
    of plugin ``files`` (``callback``), with upstreams ``a`` (Unix) and ``b`` (TCP)."""

    plane: Any
    decider: Decider
    a: Upstream
    b: Upstream
    internal: Internal
    tcp: str
    unix: str
    callback: str
    dir: Path


class Background:
    """Runs a blocking function on a thread (``stop``), result in ``result``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        self.result = fn()


async def _serve_forever(address: str) -> None:
    up = Upstream(f"proc{os.getpid()}", address)
    await up.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_forever(sys.argv[1]))
