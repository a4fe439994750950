"""Chaos against a running mesh: calls and streams while replicas are SIGKILLed or SIGSTOPped.

Everything here talks to the mesh as a client does (``clients``), and finds
the replicas to hurt through ``MeshService``. Every loop is bounded in count
and in time; every call has a deadline, so a hang shows as DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from clients import AsyncMeshClient, SidemeshError
from sidemesh.v1 import mesh_pb2

PLUGIN = "chaos"


@dataclass
class Kill:
    """One replica the killer ended."""

    replica: int
    pid: int
    at: float


@dataclass
class Report:
    """What the clients saw, and what the mesh reported, during one chaos run."""

    unary_calls: int = 0
    unary_ok: int = 0
    unary_failures: dict[str, int] = field(default_factory=dict)
    unary_failure_samples: list[str] = field(default_factory=list)
    streams: int = 0
    streams_ok: int = 0
    streams_truncated: int = 0
    streams_unavailable: int = 0
    streams_unavailable_not_on_killed: int = 0
    streams_other_failures: dict[str, int] = field(default_factory=dict)
    hangs: int = 0
    kills: list[Kill] = field(default_factory=list)
    restarts: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sigsegv(self) -> int:
        """Replica exits by SIGSEGV."""
        return sum(n for why, n in self.exits.items() if "SIGSEGV" in why)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "unary": {"calls": self.unary_calls, "ok": self.unary_ok,
                      "failures": self.unary_failures, "samples": self.unary_failure_samples[:5]},
            "streams": {"started": self.streams, "ok": self.streams_ok,
                        "silently_truncated": self.streams_truncated,
                        "unavailable": self.streams_unavailable,
                        "unavailable_not_on_a_killed_replica":
                            self.streams_unavailable_not_on_killed,
                        "other_failures": self.streams_other_failures},
            "hangs": self.hangs,
            "kills": len(self.kills),
            "restarts": self.restarts,
            "exits": self.exits,
            "sigsegv": self.sigsegv,
            "seconds": round(self.seconds, 1),
        }  # fmt: skip


async def ready_replicas(client: AsyncMeshClient) -> list[mesh_pb2.ReplicaStatus]:
    """The chaos plugin's READY replicas."""
    status = await client.get_plugin(PLUGIN, timeout=5)
    return [r for r in status.replicas if r.state == mesh_pb2.REPLICA_STATE_READY and r.pid]


async def killer(
    client: AsyncMeshClient, report: Report, every: float, stop: asyncio.Event, keep: int = 2
) -> None:
    """SIGKILLs a random READY replica every ``every`` seconds, while ``keep`` others are READY."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            ready = await ready_replicas(client)
        except SidemeshError:
            continue
        if len(ready) <= keep - 1 or len(ready) < 2:
            continue
        victim = random.choice(ready)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
            report.kills.append(Kill(victim.index, victim.pid, time.monotonic()))


async def watch_exits(client: AsyncMeshClient, report: Report, stop: asyncio.Event) -> None:
    """Counts restarts (replicas ready again) and why replicas exited, until ``stop``."""
    stream = client.watch_events(plugin=PLUGIN, lifecycle_only=True)

    async def read() -> None:
        async for event in stream:
            kind = event.WhichOneof("event")
            if kind == "replica_exited" and event.replica_exited.will_restart:
                why = event.replica_exited.reason
                report.exits[why] = report.exits.get(why, 0) + 1
            elif kind == "replica_ready":
                report.restarts += 1

    reader = asyncio.create_task(read())
    try:
        await stop.wait()
        await asyncio.sleep(1.0)  # the last kill's exit and restart
    finally:
        stream.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, SidemeshError):
            await reader


async def unary_load(
    client: AsyncMeshClient,
    report: Report,
    calls: int,
    concurrency: int,
    deadline: float,
    rate: float | None = None,
) -> None:
    """``calls`` idempotent ``chaos/echo`` calls, ``concurrency`` at a time, each checked.

    With ``rate``, calls start at most ``rate`` per second (so that the load
    spans many kills).
    """
    queue = iter(range(calls))
    t0 = time.monotonic()

    async def worker() -> None:
        for i in queue:
            if rate is not None:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            if time.monotonic() > deadline:
                return
            report.unary_calls += 1
            text = f"call-{i}"
            try:
                result = await client.call_tool(f"{PLUGIN}/echo", text=text, timeout=10)
            except SidemeshError as exc:
                name = exc.code.name
                report.unary_failures[name] = report.unary_failures.get(name, 0) + 1
                if name == "DEADLINE_EXCEEDED":
                    report.hangs += 1
                report.unary_failure_samples.append(f"{name}: {exc.message}")
                continue
            assert result.structured is not None and result.structured["text"] == text, result
            report.unary_ok += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def stream_load(
    client: AsyncMeshClient,
    report: Report,
    concurrency: int,
    stop: asyncio.Event,
    count: int = 40,
    delay: float = 0.01,
) -> None:
    """Agent streams (``count`` deltas each) until ``stop``; each ending is classified.

    A stream either completes whole, or fails with UNAVAILABLE while its
    replica was being killed. Anything else (ended OK but short, another
    status, a hang) is what the mesh must never do.
    """

    async def one() -> None:
        report.streams += 1
        started = time.monotonic()
        replica, deltas, result = -1, 0, None
        try:
            async for event in client.invoke(
                f"{PLUGIN}/stream", {"count": count, "delay": delay}, timeout=15
            ):
                kind = event.WhichOneof("event")
                if kind == "text_delta":
                    if replica < 0 and event.text_delta.text.startswith("r"):
                        replica = int(event.text_delta.text[1:].rstrip(":"))
                    else:
                        deltas += 1
                elif kind == "result":
                    result = event.result
        except SidemeshError as exc:
            name = exc.code.name
            if name == "UNAVAILABLE":
                report.streams_unavailable += 1
                ended = time.monotonic()
                killed = any(
                    k.replica == replica and started - 0.5 <= k.at <= ended + 0.5
                    for k in report.kills
                )
                if replica >= 0 and not killed:
                    report.streams_unavailable_not_on_killed += 1
            else:
                if name == "DEADLINE_EXCEEDED":
                    report.hangs += 1
                report.streams_other_failures[name] = report.streams_other_failures.get(name, 0) + 1
            return
        if deltas != count or result is None:
            report.streams_truncated += 1
        else:
            report.streams_ok += 1

    async def worker() -> None:
        while not stop.is_set():
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_kills(
    address: str,
    *,
    calls: int,
    kill_every: float,
    rate: float | None = None,
    concurrency: int = 16,
    stream_concurrency: int = 4,
    time_limit: float = 300.0,
    min_kills: int = 0,
) -> Report:
    """Unary calls and streams while one replica is SIGKILLed every ``kill_every`` seconds.

    The load goes on past ``calls``, in batches, until ``min_kills`` kills were
    made (a slow machine restarts replicas slowly, and the killer always leaves
    two READY), within ``time_limit``.
    """
    report = Report()
    t0 = time.monotonic()
    async with AsyncMeshClient(address) as client:
        stop = asyncio.Event()
        background = [
            asyncio.create_task(killer(client, report, kill_every, stop)),
            asyncio.create_task(watch_exits(client, report, stop)),
            asyncio.create_task(stream_load(client, report, stream_concurrency, stop)),
        ]
        try:
            await unary_load(client, report, calls, concurrency, t0 + time_limit, rate)
            while len(report.kills) < min_kills and time.monotonic() - t0 < time_limit:
                await unary_load(client, report, 50, concurrency, t0 + time_limit, rate)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*background, return_exceptions=True), 30)
    report.seconds = time.monotonic() - t0
    return report


async def run_restarts(
    address: str, *, restarts: int, kill_every: float, time_limit: float = 300.0
) -> Report:
    """Kills replicas under load until ``restarts`` restarts were seen; counts how they exited."""
    report = Report()
    t0 = time.monotonic()
    async with AsyncMeshClient(address) as client:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_exits(client, report, stop))
        kills = asyncio.create_task(killer(client, report, kill_every, stop, keep=1))
        load_stop = asyncio.Event()
        load = asyncio.create_task(stream_load(client, report, 4, load_stop, count=20))
        try:
            while report.restarts < restarts and time.monotonic() - t0 < time_limit:
                await unary_load(client, report, 200, 16, t0 + time_limit)
        finally:
            stop.set()
            load_stop.set()
            await asyncio.wait_for(asyncio.gather(watcher, kills, load, return_exceptions=True), 30)
    report.seconds = time.monotonic() - t0
    return report
