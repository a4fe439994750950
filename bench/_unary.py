"""The unary tool call (``CallTool`` of ``bench/echo``, one result) from Python clients.

Latency is measured one call at a time with the generated ``grpc.aio`` stubs,
throughput with 64 calls in flight from one asyncio process. Every call's
result is checked: a call that fails or returns something else is an error.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf import struct_pb2

from bench._dial import Dial
from clients import AsyncMeshClient
from sidemesh.v1 import tool_pb2, tool_pb2_grpc

#: The tool every topology calls; a sidecar accepts its own plugin's qualified names.
TOOL = "bench/echo"
#: The echoed payload: 32 bytes, about the size of a small tool argument.
PAYLOAD = "sidemesh-bench-payload-32-bytes!"


def echo_request(payload: str = PAYLOAD) -> tool_pb2.CallToolRequest:
    """The request every unary measurement sends."""
    arguments = struct_pb2.Struct()
    arguments.update({"payload": payload})
    return tool_pb2.CallToolRequest(tool=TOOL, arguments=arguments)


def grpc_frame(message: bytes) -> bytes:
    """``message`` as one gRPC length-prefixed message (uncompressed flag, 4-byte length)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def check_echo(responses: list[tool_pb2.CallToolResponse], payload: str = PAYLOAD) -> None:
    """Raises ``ValueError`` unless ``responses`` is one result echoing ``payload``."""
    if len(responses) != 1 or responses[0].WhichOneof("event") != "result":
        raise ValueError(f"expected one result event, got {responses!r}")
    result = responses[0].result
    if result.is_error or not result.content or result.content[0].text != payload:
        raise ValueError(f"the echo tool returned {result!r}")


@dataclass
class Latency:
    """Per-call latencies of one measured phase."""

    seconds: list[float] = field(default_factory=list)
    errors: int = 0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) in seconds, nearest rank; NaN without data."""
        if not self.seconds:
            return float("nan")
        ordered = sorted(self.seconds)
        rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
        return ordered[rank]


async def unary_latency(
    dial: Dial, calls: int, warmup: int, time_limit: float, call_timeout: float = 10.0
) -> Latency:
    """``calls`` sequential calls after ``warmup`` unmeasured ones, within ``time_limit`` s."""
    request = echo_request()
    out = Latency()
    deadline = time.monotonic() + time_limit
    metadata = dial.metadata
    async with dial.aio_channel() as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        for i in range(warmup + calls):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            try:
                call = stub.CallTool(request, timeout=call_timeout, metadata=metadata)
                responses = [r async for r in call]
                check_echo(responses)
            except (grpc.RpcError, ValueError):
                out.errors += 1
                continue
            if i >= warmup:
                out.seconds.append(time.perf_counter() - t0)
    return out


async def clients_latency(address: str, calls: int, warmup: int, time_limit: float) -> Latency:
    """The same measurement through ``clients.AsyncMeshClient.call_tool`` (its defaults)."""
    out = Latency()
    deadline = time.monotonic() + time_limit
    async with AsyncMeshClient(address, timeout=10.0) as mesh:
        for i in range(warmup + calls):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            try:
                result = await mesh.call_tool(TOOL, payload=PAYLOAD)
                ok = not result.is_error and result.text == PAYLOAD
            except Exception:
                ok = False
            if not ok:
                out.errors += 1
            elif i >= warmup:
                out.seconds.append(time.perf_counter() - t0)
    return out


@dataclass
class Throughput:
    """Completed calls (or messages) in a measured window."""

    count: int
    seconds: float
    errors: int

    @property
    def rate(self) -> float:
        """Per second."""
        return self.count / self.seconds if self.seconds > 0 else 0.0


async def unary_throughput(
    dial: Dial, concurrency: int, duration: float, warmup: float, call_timeout: float = 10.0
) -> Throughput:
    """Calls completed per second with ``concurrency`` calls in flight, over ``duration`` s.

    The workers run for ``warmup + duration`` seconds; calls completing in the
    first ``warmup`` seconds are not counted.
    """
    request = echo_request()
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration
    counted = errors = 0
    metadata = dial.metadata

    async def worker(stub: tool_pb2_grpc.ToolServiceAsyncStub) -> None:
        nonlocal counted, errors
        while time.monotonic() < stop_at:
            try:
                call = stub.CallTool(request, timeout=call_timeout, metadata=metadata)
                responses = [r async for r in call]
                check_echo(responses)
            except (grpc.RpcError, ValueError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            if measure_from <= time.monotonic() <= stop_at:
                counted += 1

    async with dial.aio_channel() as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        await asyncio.wait_for(
            asyncio.gather(*(worker(stub) for _ in range(concurrency))),
            timeout=warmup + duration + call_timeout + 5,
        )
    return Throughput(counted, duration, errors)


async def verify_body(dial: Dial, body: bytes) -> int:
    """Sends the exact h2load request body once; returns the response's framed size.

    Raises ``ValueError`` unless the call ends with status OK and one result
    echoing :data:`PAYLOAD`: h2load only sees HTTP status 200, not grpc-status.
    """
    length = int.from_bytes(body[1:5], "big")
    if body[0] != 0 or len(body) != 5 + length:
        raise ValueError("the request body is not one uncompressed gRPC message")
    async with dial.aio_channel() as channel:
        method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/sidemesh.v1.ToolService/CallTool"
        )
        call = method(body[5:], timeout=10, metadata=dial.metadata)
        raw: list[bytes] = [r async for r in call]  # no deserializer: the bytes as sent
        if await call.code() != grpc.StatusCode.OK:
            raise ValueError(f"the h2load body got {await call.code()}: {await call.details()}")
    check_echo([tool_pb2.CallToolResponse.FromString(r) for r in raw])
    return sum(5 + len(r) for r in raw)
