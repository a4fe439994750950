"""One client process of the idle-streams phase: ``python -m bench._idle_client ...``.

Opens ``--streams`` slow agent streams (``count`` deltas ``delay`` s apart)
spread over ``--channels`` channels, at most ``--window`` of them waiting for
their first delta at a time (a burst beyond gRPC core's pending-request limit
of a Python server is cancelled, see bench/README.md), and prints one JSON line of progress
about every half second, then a last line with ``"final": true``. A stream is
*open* once its first delta arrived, *finished* when it ended, *ok* when it
ended COMPLETED with all its deltas. Everything ends by ``--time-limit``.

With ``--gaps FILE`` (the slow token streams phase) it also writes, at the
end, every gap between two consecutive deltas of a stream: pairs of doubles
(the later delta's ``time.monotonic()``, the gap in seconds), so that the
harness can keep those of its measured window (CLOCK_MONOTONIC is the same
in every process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench._dial import CHANNEL_OPTIONS
from bench._streams import stream_request
from sidemesh.v1 import agent_pb2, agent_pb2_grpc


class Progress:
    """Counters of this process's streams."""

    def __init__(self) -> None:
        self.started = self.opened = self.finished = self.ok = self.errors = 0
        self.tokens = 0
        self.first_error = ""
        #: (arrival, gap) pairs, when gaps are recorded.
        self.gaps: array[float] | None = None

    def line(self, **extra: object) -> str:
        """The counters as one JSON line."""
        return json.dumps(
            {"started": self.started, "opened": self.opened, "finished": self.finished,
             "ok": self.ok, "errors": self.errors, "tokens": self.tokens,
             "first_error": self.first_error, "now": time.monotonic(), **extra}
        )  # fmt: skip


async def _stream(
    stub: agent_pb2_grpc.AgentServiceAsyncStub,
    request: agent_pb2.InvokeRequest,
    count: int,
    timeout: float,
    progress: Progress,
    window: asyncio.Semaphore,
) -> None:
    received, completed = 0, False
    progress.started += 1
    gaps = progress.gaps
    last = 0.0
    try:
        async for event in stub.Invoke(request, timeout=timeout):
            kind = event.WhichOneof("event")
            if kind == "text_delta":
                received += 1
                progress.tokens += 1
                if gaps is not None:
                    now = time.monotonic()
                    if received > 1:
                        gaps.append(now)
                        gaps.append(now - last)
                    last = now
                if received == 1:
                    progress.opened += 1
                    window.release()
            elif kind == "result":
                completed = event.result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED
    except grpc.aio.AioRpcError as exc:
        if not progress.first_error:
            progress.first_error = f"{exc.code().name}: {exc.details()}"
    except Exception as exc:  # counted as an error like any other failed stream
        if not progress.first_error:
            progress.first_error = f"{type(exc).__name__}: {exc}"
    if received == 0:
        window.release()
    progress.finished += 1
    if completed and received == count:
        progress.ok += 1
    else:
        progress.errors += 1


async def run(args: argparse.Namespace) -> None:
    """Runs the streams, reporting progress on stdout."""
    progress = Progress()
    if args.gaps:
        progress.gaps = array("d")
    request = stream_request(args.count, args.size, args.delay)
    channels = [
        grpc.aio.insecure_channel(args.address, options=CHANNEL_OPTIONS)
        for _ in range(args.channels)
    ]
    stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in channels]
    deadline = time.monotonic() + args.time_limit

    async def report() -> None:
        while True:
            print(progress.line(), flush=True)
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report())
    window = asyncio.Semaphore(args.window)
    tasks = []
    for i in range(args.streams):
        remaining = deadline - time.monotonic()
        if remaining <= 1:
            break
        try:
            await asyncio.wait_for(window.acquire(), remaining - 1)
        except TimeoutError:
            break
        remaining = deadline - time.monotonic()
        stub = stubs[i % len(stubs)]
        tasks.append(
            asyncio.create_task(_stream(stub, request, args.count, remaining, progress, window))
        )
    if tasks:
        await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0) + 2)
    reporter.cancel()
    for channel in channels:
        await channel.close()
    if args.gaps and progress.gaps is not None:
        await asyncio.to_thread(Path(args.gaps).write_bytes, progress.gaps.tobytes())
    print(progress.line(final=True), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the arguments and runs."""
    parser = argparse.ArgumentParser(prog="python -m bench._idle_client")
    parser.add_argument("--address", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--delay", type=float, default=2.0)
    parser.add_argument(
        "--window", type=int, default=200, help="streams waiting for their first delta at most"
    )
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--gaps", help="write the gaps between consecutive deltas to this file")
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
