"""Resource limits in a real mesh: ``tests/plugins/hog`` goes past each one.

The fork bomb, the file size, memory and CPU limits each hold; a sidecar
killed by one is reported with the limit's name (``replica_exited``, the
plugin's state, its ``last_exit``, the log) and restarted; a call whose
sidecar is killed fails at once (``UNAVAILABLE``), so those calls have short
deadlines; the rest of the mesh keeps serving throughout.
"""

from __future__ import annotations

import asyncio

import pytest
from meshproc import wait_until
from sandboxkit import (
    HOG,
    TOOLS_DEMO,
    MakeMesh,
    assert_mesh_serves,
    attack,
    next_event,
    plugin_processes,
    state_reasons,
    watching,
)

from clients import AsyncMeshClient, UnavailableError
from sidemesh.v1 import mesh_pb2

pytestmark = pytest.mark.integration


async def test_a_fork_bomb_is_held_to_its_process_limit(make_mesh: MakeMesh) -> None:
    """hog forks as fast as it can with a limit of 32 processes: it never has more than 32,
    and tools-demo answers all along.

    At the limit fork fails with EAGAIN, which the tool reports; or, since a
    gRPC process that cannot start a thread aborts, the bomb takes its own
    sidecar down and the mesh restarts it. Either way its children are gone.
    """
    mesh = make_mesh(plugin_dirs=[str(HOG), str(TOOLS_DEMO)]).start(ready=["hog", "tools-demo"])
    most = 0
    async with AsyncMeshClient(mesh.address) as client:
        bomb = asyncio.create_task(
            client.call_tool("hog/fork_bomb", seconds=3, max_children=256, timeout=15)
        )
        for _ in range(200):
            if bomb.done():
                break
            most = max(most, len(plugin_processes(mesh, "hog")))
            result = await client.call_tool("tools-demo/add", a=1, b=2, timeout=5)
            assert result.structured == {"result": 3}
            await asyncio.sleep(0.02)
        try:
            got = (await bomb).structured
        except UnavailableError:
            got = None  # the bomb took its own sidecar down
    assert most <= 32, f"hog ran {most} processes at once"
    if got is not None:
        assert got["children"] < 32 and got["error"] == "EAGAIN", f"not stopped: {got}"
    mesh.wait_state("hog", "READY")
    wait_until(
        lambda: len(plugin_processes(mesh, "hog")) == 1, 10, "the fork bomb's children to be gone"
    )
    await assert_mesh_serves(mesh)


async def test_a_file_past_its_size_limit_cannot_be_written(make_mesh: MakeMesh) -> None:
    """Writing 4 MiB with a 1 MiB file size limit fails with EFBIG; the host file stays small."""
    mesh = make_mesh(plugin_dirs=[str(HOG), str(TOOLS_DEMO)]).start(ready=["hog", "tools-demo"])
    got = await attack(mesh, "hog/write_big", megabytes=4)
    assert not got["ok"] and got["error"] == "EFBIG", got
    on_host = mesh.state_dir / "data" / "hog" / "big.bin"
    assert on_host.stat().st_size <= 1 << 20
    assert mesh.plugin("hog").restarts == 0
    await assert_mesh_serves(mesh)


async def test_memory_past_its_limit_is_refused_or_killed_and_reported(
    make_mesh: MakeMesh,
) -> None:
    """hog asks for 512 MiB with a 128 MiB limit: the allocation fails, or the sidecar is
    killed, reported as a memory limit kill, and restarted."""
    mesh = make_mesh(plugin_dirs=[str(HOG), str(TOOLS_DEMO)]).start(ready=["hog", "tools-demo"])
    first_pid = mesh.plugin("hog").replicas[0].pid
    async with watching(mesh, "hog") as events, AsyncMeshClient(mesh.address) as client:
        try:
            result = await client.call_tool("hog/allocate", megabytes=512, timeout=15)
        except UnavailableError:
            exited = await next_event(events, "replica_exited", 15)
            assert "memory limit" in exited.reason, exited
            assert exited.will_restart
            await next_event(events, "replica_ready", 20)
            reasons = state_reasons(events)
            assert any("memory limit" in r for r in reasons), f"plugin state reasons: {reasons}"
        else:
            got = result.structured
            assert got is not None
            assert not got["ok"] and got["allocated_mb"] <= 128, f"allocated past the limit: {got}"

        status = mesh.wait_state("hog", "READY")
        if status.replicas[0].pid != first_pid:  # it was killed
            assert "memory limit" in status.replicas[0].last_exit, status
            assert "memory limit" in mesh.log()
        again = await client.call_tool("hog/allocate", megabytes=16, timeout=10)
    assert again.structured is not None and again.structured["ok"]
    await assert_mesh_serves(mesh)


async def test_cpu_past_its_limit_is_killed_reported_and_restarted(make_mesh: MakeMesh) -> None:
    """hog spins for 10 s with a CPU time limit of 2 s: it is killed, the kill is reported as
    the CPU time limit, and a new sidecar takes over."""
    mesh = make_mesh(plugin_dirs=[str(HOG), str(TOOLS_DEMO)]).start(ready=["hog", "tools-demo"])
    first_pid = mesh.plugin("hog").replicas[0].pid
    async with watching(mesh, "hog") as events, AsyncMeshClient(mesh.address) as client:
        try:
            result = await client.call_tool("hog/spin", seconds=10, timeout=15)
        except UnavailableError:
            pass  # the sidecar died under the call
        else:
            pytest.fail(f"spin was not stopped by the CPU time limit: {result.structured}")
        exited = await next_event(events, "replica_exited", 15)
        assert "CPU time limit" in exited.reason, exited
        assert exited.will_restart
        await next_event(events, "replica_ready", 20)
        reasons = state_reasons(events)
        assert any("CPU time limit" in r for r in reasons), f"plugin state reasons: {reasons}"

        status = wait_until(
            lambda: (
                (s := mesh.plugin("hog")).state == mesh_pb2.PLUGIN_STATE_READY
                and s.replicas[0].pid not in (0, first_pid)
                and s
            ),
            15,
            "a new hog replica",
        )
        assert "CPU time limit" in status.replicas[0].last_exit, status
        assert "CPU time limit" in mesh.log()
        again = await client.call_tool("hog/spin", seconds=0.1, timeout=10)
    assert again.structured is not None and again.structured["ok"]
    await assert_mesh_serves(mesh)
