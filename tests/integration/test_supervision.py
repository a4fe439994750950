"""Sidecar lifecycle in a real mesh: crashes, hangs, bad plugins, shutdown, no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from meshproc import (
    EXAMPLE_PLUGINS,
    TEST_PLUGINS,
    Mesh,
    process_tree,
    processes_with,
    wait_until,
)

from clients import AsyncMeshClient, UnavailableError
from sidemesh.v1 import agent_pb2, mesh_pb2

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
WORKERS = str(TEST_PLUGINS / "workers")


def _ready_pid(mesh: Mesh, plugin: str) -> int:
    status = mesh.wait_state(plugin, "READY")
    return status.replicas[0].pid


async def test_sidecar_killed_mid_stream_gives_unavailable_then_restarts(
    make_mesh: MakeMesh,
) -> None:
    mesh = make_mesh(plugin_dirs=[WORKERS]).start(ready=["workers"])
    pid = _ready_pid(mesh, "workers")
    async with AsyncMeshClient(mesh.address) as client:
        stream = client.invoke("workers/ticker", {"count": 200, "delay": 0.02})
        received = []

        async def read() -> None:
            async for event in stream:
                received.append(event)
                if len(received) == 5:
                    os.kill(pid, signal.SIGKILL)

        with pytest.raises(UnavailableError) as info:
            await asyncio.wait_for(read(), 10)
        assert len(received) >= 5
        assert not any(e.HasField("result") for e in received)
        assert "did not complete" in info.value.message

        status = wait_until(
            lambda: (
                (s := mesh.plugin("workers")).state == mesh_pb2.PLUGIN_STATE_READY
                and s.replicas[0].pid not in (0, pid)
                and s
            ),
            15,
            "a restarted replica",
        )
        assert status.restarts >= 1
        reply = await client.invoke("workers/ticker", {"count": 2}).collect()
    assert reply.result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED


def test_a_sidecar_that_never_becomes_ready_is_failed_with_its_stderr(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[str(TEST_PLUGINS / "never-ready")]).start()
    status = mesh.wait_state("never-ready", "FAILED", "CRASH_LOOP", timeout=15)
    assert "not ready within its startup timeout of 1.5s" in status.error
    assert "loading a very large model" in status.error  # the tail of its stderr
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plugins", "-a", mesh.address, "-v"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "never-ready" in out.stdout
    assert "loading a very large model" in out.stdout


async def test_a_crashing_plugin_backs_off_into_a_visible_crash_loop(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[str(TEST_PLUGINS / "crasher")]).start()
    delays: list[float] = []
    async with AsyncMeshClient(mesh.address) as client:
        async for event in client.watch_events(plugin="crasher", lifecycle_only=True, replay=50):
            if event.HasField("replica_exited") and event.replica_exited.will_restart:
                delays.append(event.replica_exited.restart_delay.ToNanoseconds() / 1e9)
            if len(delays) >= 4:
                break
    status = mesh.wait_state("crasher", "CRASH_LOOP")
    assert "cannot open database" in status.error
    assert status.replicas[0].last_exit == "exit code 3" or "exit code 3" in status.error
    assert delays == sorted(delays), f"backoff should grow: {delays}"
    assert delays[-1] > delays[0]
    assert max(delays) <= 1.0  # capped by supervisor.backoff_max


async def test_a_bad_manifest_is_reported_and_the_others_keep_serving(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(
        plugin_dirs=[str(EXAMPLE_PLUGINS / "tools-demo"), str(TEST_PLUGINS / "broken")]
    )
    mesh.start(ready=["tools-demo"])
    status = mesh.plugin("broken")
    assert status.state == mesh_pb2.PLUGIN_STATE_FAILED
    assert "plugin.yaml" in status.error
    assert "replicas" in status.error
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.call_tool("tools-demo/add", a=1, b=2)
    assert result.structured == {"result": 3}


def test_validate_names_the_file_the_field_and_the_fix() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", str(TEST_PLUGINS / "broken"),
         str(EXAMPLE_PLUGINS / "tools-demo")],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 2
    assert "broken/plugin.yaml" in out.stderr
    assert "field 'replicas'" in out.stderr
    assert "fix:" in out.stderr
    assert "ok: " in out.stdout and "tools-demo" in out.stdout


def test_serve_with_a_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "sidemesh.yaml"
    config.write_text("listen: [nowhere]\nplugins:\n  tools-demo: {replicass: 2}\n")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 2
    assert str(config) in out.stderr
    assert "field 'listen'" in out.stderr
    assert "did you mean 'replicas'" in out.stderr


async def test_a_hung_replica_is_marked_unhealthy_and_replaced(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[WORKERS]).start(ready=["workers"])
    pid = _ready_pid(mesh, "workers")
    stopped = process_tree(pid)  # in a sandbox the sidecar runs below bwrap
    for member in stopped:
        os.kill(member, signal.SIGSTOP)
    try:
        async with AsyncMeshClient(mesh.address) as client:
            async for event in client.watch_events(plugin="workers", lifecycle_only=True):
                if event.HasField("replica_exited"):
                    assert "unhealthy" in event.replica_exited.reason
                    break
        status = wait_until(
            lambda: (
                (s := mesh.plugin("workers")).replicas[0].pid not in (0, pid)
                and s.state == mesh_pb2.PLUGIN_STATE_READY
            ),
            15,
            "a new replica",
        )
        assert status
    finally:
        for member in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGCONT)


def test_no_sidecar_outlives_an_orchestrator_killed_with_sigkill(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[str(EXAMPLE_PLUGINS), WORKERS])
    mesh.start(ready=["tools-demo", "assistant", "workers"])
    sidecars = mesh.sidecars()
    assert len(sidecars) >= 3
    assert mesh.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: not processes_with(str(mesh.runtime_dir)), 10, "every sidecar to exit")


async def test_sigterm_lets_an_in_flight_stream_finish_then_everything_exits(
    make_mesh: MakeMesh,
) -> None:
    mesh = make_mesh(plugin_dirs=[WORKERS]).start(ready=["workers"])
    assert mesh.proc is not None
    async with AsyncMeshClient(mesh.address) as client:
        stream = client.invoke("workers/ticker", {"count": 15, "delay": 0.1})
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 1:
                mesh.proc.send_signal(signal.SIGTERM)
    assert events[-1].HasField("result")
    assert sum(e.HasField("text_delta") for e in events) == 15
    code = await asyncio.to_thread(mesh.proc.wait, 20)
    assert code == 0
    assert mesh.sidecars() == []
    assert "shutting down gracefully" in mesh.log()


async def test_watch_events_reports_lifecycle_and_calls(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[WORKERS]).start(ready=["workers"])
    async with AsyncMeshClient(mesh.address) as client:
        seen: list[str] = []

        async def watch() -> None:
            async for event in client.watch_events(replay=20):
                seen.append(event.WhichOneof("event") or "")
                if "call_finished" in seen:
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        await client.call_tool("workers/echo", text="hi")
        await asyncio.wait_for(watcher, 10)
    assert "replica_started" in seen
    assert "replica_ready" in seen
    assert seen.index("call_started") < seen.index("call_finished")


@pytest.mark.parametrize("routing", ["round_robin", "least_loaded"])
async def test_calls_spread_over_replicas(make_mesh: MakeMesh, routing: str) -> None:
    mesh = make_mesh(
        plugin_dirs=[WORKERS], plugins={"workers": {"replicas": 2, "routing": routing}}
    ).start(ready=["workers"])
    replicas = {r.index for r in mesh.plugin("workers").replicas}
    assert replicas == {0, 1}
    async with AsyncMeshClient(mesh.address) as client:
        if routing == "least_loaded":
            # One replica is busy with a long call: the next calls go to the other.
            busy = asyncio.create_task(client.call_tool("workers/sleepy", seconds=3, tag="busy"))
            await asyncio.sleep(0.3)
        served = [(await client.call_tool("workers/whoami")).structured for _ in range(6)]
        if routing == "least_loaded":
            busy.cancel()
    seen = {s["result"] for s in served if s}
    assert seen <= replicas
    assert len(seen) == (2 if routing == "round_robin" else 1)
