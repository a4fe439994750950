"""Agent streams: ``Invoke`` of the ``stream`` agent, text deltas of a fixed size, counted.

A phase opens ``streams`` concurrent ``Invoke`` calls on one channel, each
asking for ``count`` deltas of ``size`` bytes as fast as they can go, and
measures from the first request to the last stream's end. Every stream must
end with a COMPLETED result after exactly ``count`` deltas of ``size`` bytes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from bench._dial import Dial
from sidemesh.v1 import agent_pb2, agent_pb2_grpc

AGENT = "bench/stream"


def stream_request(count: int, size: int, delay: float) -> agent_pb2.InvokeRequest:
    """An ``Invoke`` of the ``stream`` agent."""
    request = agent_pb2.InvokeRequest(agent=AGENT)
    request.input.data.update({"count": count, "size": size, "delay": delay})
    return request


@dataclass
class StreamRun:
    """Messages and payload bytes received by one phase, and how long it took."""

    streams: int
    size: int
    messages: int
    seconds: float
    errors: int

    @property
    def messages_per_second(self) -> float:
        """Text deltas received per second, all streams together."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        """Payload (delta text) megabytes (10^6 bytes) per second."""
        return self.messages_per_second * self.size / 1e6


async def _one_stream(
    stub: agent_pb2_grpc.AgentServiceAsyncStub,
    count: int,
    size: int,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[int, bool]:
    """Reads one stream; returns (deltas received, ended as it should)."""
    received = 0
    completed = False
    try:
        async for event in stub.Invoke(
            stream_request(count, size, 0.0), timeout=timeout, metadata=metadata
        ):
            kind = event.WhichOneof("event")
            if kind == "text_delta":
                if received == 0 and len(event.text_delta.text) != size:
                    return received, False
                received += 1
            elif kind == "result":
                completed = event.result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED
    except grpc.RpcError:
        return received, False
    return received, completed and received == count


async def stream_throughput(
    dial: Dial, streams: int, count: int, size: int, time_limit: float
) -> StreamRun:
    """``streams`` concurrent streams of ``count`` deltas each; bounded by ``time_limit`` s."""
    metadata = dial.metadata
    async with dial.aio_channel() as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        await _one_stream(stub, min(count, 100), size, 10.0, metadata)  # warm the connection up
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_one_stream(stub, count, size, time_limit, metadata) for _ in range(streams))
        )
        seconds = time.perf_counter() - t0
    return StreamRun(
        streams=streams,
        size=size,
        messages=sum(n for n, _ in results),
        seconds=seconds,
        errors=sum(1 for _, ok in results if not ok),
    )
