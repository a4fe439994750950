"""Faults become retries, not errors: replicas SIGKILLed and SIGSTOPped under load, slow readers.

The scenarios are ``bench.chaos``'s (``python -m bench.chaos`` runs them at
full size for the figures), here bounded to seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest
from meshproc import TEST_PLUGINS, Mesh, process_tree, wait_until
from sandboxkit import next_event, watching

from bench.chaos import run_kills, run_restarts
from clients import AsyncMeshClient
from orchestrator._process import tree_rss_bytes

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
CHAOS = str(TEST_PLUGINS / "chaos")
#: Restart at once: kills come faster than the default backoff.
QUICK_RESTARTS = {"backoff_initial": 0.1, "backoff_max": 0.3, "crash_loop_after": 1000,
                  "min_uptime": 0.5}  # fmt: skip


def _chaos_mesh(make_mesh: MakeMesh, supervisor: dict[str, object] | None = None,
                **config: object) -> Mesh:  # fmt: skip
    mesh = make_mesh(plugin_dirs=[CHAOS], **config)
    mesh.config["supervisor"].update({**QUICK_RESTARTS, **(supervisor or {})})
    return mesh.start(ready=["chaos"])


@pytest.mark.timeout(180)
async def test_replicas_killed_under_load_fail_no_idempotent_call_and_truncate_no_stream(
    make_mesh: MakeMesh,
) -> None:
    mesh = _chaos_mesh(make_mesh)
    report = await run_kills(
        mesh.address, calls=400, kill_every=0.8, rate=60, time_limit=90, min_kills=5
    )
    summary = report.as_dict()
    assert len(report.kills) >= 5, summary
    assert report.unary_calls >= 400 and report.unary_ok == report.unary_calls, summary
    assert report.streams_truncated == 0, summary
    assert report.hangs == 0, summary
    assert not report.streams_other_failures, summary
    # A stream fails only while in flight on a replica that was killed, and says so.
    assert report.streams_unavailable_not_on_killed == 0, summary
    assert report.streams_ok > 0, summary


@pytest.mark.timeout(180)
async def test_replicas_restart_under_load_without_crashing(make_mesh: MakeMesh) -> None:
    """Sidecars are spawned without fork(): none dies of anything but the kills."""
    mesh = _chaos_mesh(make_mesh)
    report = await run_restarts(mesh.address, restarts=25, kill_every=0.3, time_limit=90)
    assert report.restarts >= 25, report.as_dict()
    assert set(report.exits) == {"exited: killed by SIGKILL"}, report.exits
    assert "skipping fork() handlers" not in mesh.log()


@pytest.mark.timeout(120)
async def test_a_stopped_replica_is_ejected_and_calls_go_to_the_others(make_mesh: MakeMesh) -> None:
    mesh = _chaos_mesh(
        make_mesh,
        supervisor={"health_failures": 100},  # ejection, not replacement, is tested here
        retries={"per_try_timeout": 0.3},
        outlier_detection={"consecutive_failures": 2, "base_ejection": 30},
    )
    target = mesh.plugin("chaos").replicas[1]
    async with watching(mesh, "chaos") as events, AsyncMeshClient(mesh.address) as client:
        tree = process_tree(target.pid)
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:

            async def calls(n: int) -> None:
                for i in range(n):
                    result = await client.call_tool("chaos/echo", text=f"x{i}", timeout=5)
                    assert result.structured is not None

            await asyncio.gather(*(calls(15) for _ in range(8)))  # every call succeeds
            ejected = await next_event(
                events, "replica_ejected", 5, lambda e: e.replica == target.index
            )
            assert time.monotonic() - stopped < 5
            status = mesh.plugin("chaos").replicas[1]
            assert status.HasField("ejected_until") and status.ejection_reason == ejected.reason
            for pid in tree:
                os.kill(pid, signal.SIGCONT)
            served = set()
            for _ in range(12):
                result = await client.call_tool("chaos/echo", text="y")
                assert result.structured is not None
                served.add(result.structured["replica"])
            assert target.index not in served  # still ejected: its ejection lasts 30 s
        finally:
            for pid in tree:
                os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(120)
async def test_a_slow_reader_slows_the_stream_instead_of_filling_memory(
    make_mesh: MakeMesh,
) -> None:
    """20 streams of 64 KiB deltas, read slowly: neither the sidecar nor the orchestrator
    buffers them (before, a replica reached its memory limit within half a second)."""
    mesh = _chaos_mesh(make_mesh, plugins={"chaos": {"replicas": 1}})
    assert mesh.proc is not None
    sidecar = mesh.plugin("chaos").replicas[0].pid
    before = tree_rss_bytes(sidecar), tree_rss_bytes(mesh.proc.pid)
    async with AsyncMeshClient(mesh.address) as client:
        streams = [
            client.invoke("chaos/stream", {"count": 2000, "size": 65536}, timeout=60)
            for _ in range(20)
        ]
        iterators = [aiter(s) for s in streams]
        for _ in range(30):  # each stream read slowly: 30 deltas in ~3 s, of 2,000
            await asyncio.gather(*(anext(it) for it in iterators))
            await asyncio.sleep(0.1)
        grown = (
            tree_rss_bytes(sidecar) - before[0],
            tree_rss_bytes(mesh.proc.pid) - before[1],
        )
        for stream in streams:
            stream.cancel()
    # Unbounded, 20 streams x 2,000 x 64 KiB would be 2.5 GiB.
    assert grown[0] < 80 << 20, f"the sidecar grew by {grown[0] >> 20} MiB"
    assert grown[1] < 80 << 20, f"the orchestrator grew by {grown[1] >> 20} MiB"
    assert mesh.plugin("chaos").restarts == 0
    wait_until(lambda: mesh.plugin("chaos").replicas[0].in_flight == 0, 10, "streams to end")
