"""Start-up and shutdown faults say what went wrong: the plugin, the field, the state, why."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from meshproc import TEST_PLUGINS, Mesh, wait_until

from clients import AsyncMeshClient, NotFoundError, UnavailableError
from sidemesh.v1 import mesh_pb2

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
WORKERS = str(TEST_PLUGINS / "workers")
NEVER_READY = str(TEST_PLUGINS / "never-ready")


def _plugin_dir(root: Path, name: str, manifest: str) -> str:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "plugin.yaml").write_text(manifest)
    return str(directory)


async def test_serve_refuses_a_plugin_whose_command_validate_rejects(
    make_mesh: MakeMesh, tmp_path: Path
) -> None:
    missing = _plugin_dir(
        tmp_path, "missing",
        "name: missing\nversion: '1'\nentrypoint: [./no-such-binary]\nprovides: {tools: [x]}\n",
    )  # fmt: skip
    mesh = make_mesh(plugin_dirs=[missing, WORKERS]).start(ready=["workers"])
    status = mesh.wait_state("missing", "FAILED")
    assert "plugin.yaml" in status.error and "field 'entrypoint'" in status.error
    assert "'./no-such-binary' was not found" in status.error and "fix:" in status.error
    assert status.restarts == 0 and not status.replicas  # never launched, never crash-looped
    async with AsyncMeshClient(mesh.address) as client:
        with pytest.raises(UnavailableError, match="it is FAILED"):
            await client.call_tool("missing/x")
        with pytest.raises(UnavailableError, match="it is FAILED"):
            await client.call_tool("x")  # declared in its manifest: known, not serving
        with pytest.raises(NotFoundError):
            await client.call_tool("workers/nope")


async def test_a_start_that_fails_slowly_reaches_crash_loop(make_mesh: MakeMesh) -> None:
    """never-ready fails each start after its 1.5 s startup timeout, past min_uptime (1 s)."""
    mesh = make_mesh(plugin_dirs=[NEVER_READY])
    mesh.config["supervisor"].update({"min_uptime": 1.0, "backoff_max": 0.5})
    mesh.start()
    status = mesh.wait_state("never-ready", "CRASH_LOOP", timeout=30)
    assert "not ready within its startup timeout" in status.error
    async with AsyncMeshClient(mesh.address) as client:
        with pytest.raises(UnavailableError, match="it is CRASH_LOOP"):
            await client.invoke("never-ready/anything").collect()


async def test_a_disabled_plugin_and_its_replicas_say_so(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(
        plugin_dirs=[WORKERS, NEVER_READY], plugins={"never-ready": {"enabled": False}}
    )
    mesh.start(ready=["workers"])
    status = mesh.plugin("never-ready")
    assert status.state == mesh_pb2.PLUGIN_STATE_DISABLED
    assert [r.state for r in status.replicas] == [mesh_pb2.REPLICA_STATE_STOPPED]


async def test_a_replay_shows_calls_made_while_nobody_watched(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[WORKERS]).start(ready=["workers"])
    async with AsyncMeshClient(mesh.address) as client:
        await client.call_tool("workers/echo", text="unwatched")
        kinds = []
        async for event in client.watch_events(plugin="workers", replay=50, timeout=3):
            kinds.append(event.WhichOneof("event"))
            if kinds[-1] == "call_finished":
                assert event.call_finished.target == "workers/echo"
                assert event.call_finished.attempts == 1
                break
    assert "call_started" in kinds and "call_finished" in kinds


async def test_shutdown_tells_calls_cut_off_after_the_grace_period_why(
    make_mesh: MakeMesh,
) -> None:
    mesh = make_mesh(plugin_dirs=[WORKERS])
    mesh.config["supervisor"]["shutdown_grace"] = 1.0
    mesh.start(ready=["workers"])
    assert mesh.proc is not None
    async with AsyncMeshClient(mesh.address) as client:
        stream = client.invoke("workers/ticker", {"count": 1000, "delay": 0.05}, timeout=30)
        await anext(aiter(stream))
        mesh.proc.send_signal(signal.SIGTERM)
        with pytest.raises(UnavailableError) as info:
            async for _ in stream:
                pass
    assert "the mesh is shutting down" in info.value.message
    assert "Cancelling all calls" not in info.value.message
    assert await asyncio.to_thread(mesh.proc.wait, 20) == 0
    wait_until(lambda: mesh.sidecars() == [], 10, "the sidecars to exit")
