"""A hostile plugin stays in its box: no route hijack, no eavesdropping, no reaching the
mesh's listeners, no log abuse; as root and as an unprivileged user running the mesh.

The attacks are ``tests/plugins/intruder``'s tools; each test asserts what the
operator sees, and that the mesh keeps serving the other plugins.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from meshproc import EXAMPLE_PLUGINS, TEST_PLUGINS, Mesh, wait_until
from sandboxkit import assert_mesh_serves, next_event, watching

from clients import AsyncMeshClient, SidemeshError

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
INTRUDER = str(TEST_PLUGINS / "intruder")
IMPOSTOR = str(TEST_PLUGINS / "impostor")
TOOLS_DEMO = str(EXAMPLE_PLUGINS / "tools-demo")
NOBODY = 65534


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """One mesh (intruder with network granted, tools-demo) per way of running it."""
    user = NOBODY if request.param == "unprivileged" else None
    mesh = Mesh(
        tmp_path_factory.mktemp("attacks"),
        user=user,
        plugin_dirs=[INTRUDER, TOOLS_DEMO],
        plugins={"intruder": {"sandbox": {"allow_network": True}}},
    )
    try:
        mesh.start(ready=["intruder", "tools-demo"])
        yield mesh
        mesh.stop()
        leftovers = mesh.sidecars()
        assert leftovers == [], f"processes outlived the mesh: {leftovers}"
    finally:
        mesh.cleanup()


async def _attack(mesh: Mesh, tool: str, **arguments: Any) -> Any:
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.call_tool(f"intruder/{tool}", arguments, timeout=30)
    got = result.structured
    if got is None:
        return result.text
    return got["result"] if set(got) == {"result"} else got


class TestAttacks:
    async def test_the_mesh_api_on_its_callback_socket_shows_it_nothing_of_the_others(
        self, mesh: Mesh
    ) -> None:
        async with watching(mesh, "intruder") as events:
            seen = await _attack(mesh, "mesh_api")
            denied = await next_event(events, "permission_denied", 5)
        for method in ("ListPlugins", "GetPlugin", "ListTraces", "GetTrace", "WatchEvents"):
            assert seen[method] == "PERMISSION_DENIED", seen
        assert seen["ListTools"] == "tools-demo/add"  # only what it may call
        assert "permissions.mesh: [read]" in denied.reason
        await assert_mesh_serves(mesh)

    async def test_with_network_it_cannot_reach_the_mesh_listener_but_can_reach_others(
        self, mesh: Mesh
    ) -> None:
        port = int(mesh.tcp_address.rpartition(":")[2])
        refused = await _attack(mesh, "connect", port=port)
        assert refused == {"ok": False, "error": "EACCES"}, refused
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            reached = await _attack(mesh, "connect", port=other.getsockname()[1])
        assert reached == {"ok": True}
        detail = {layer.name: layer.detail for layer in mesh.plugin("intruder").sandbox}
        assert "except the mesh's own TCP listeners" in detail["network"]

    async def test_its_output_is_escaped_cut_and_rate_limited(self, mesh: Mesh) -> None:
        before = len(mesh.log())
        written = await _attack(mesh, "flood", lines=100_000)
        assert written >= 100_000
        wait_until(lambda: "lines of its output" in mesh.log()[before:], 10, "the drop count")
        log = mesh.log()[before:]
        assert "\x1b" not in log and "\x07" not in log and "\r" not in log
        assert "\\x1b]0;owned\\x07" in log  # shown, not obeyed
        forged = [line for line in log.splitlines() if "(forged)" in line]
        assert forged and all(re.match(r"^\S+ \S+\s+intruder\[0\]: ", f) for f in forged)
        assert "more bytes cut" in log
        assert len(log) < 2_000_000, f"{len(log)} bytes logged for 21 MB of output"
        replica = mesh.plugin("intruder").replicas[0]
        assert replica.output_lines_dropped > 50_000
        await assert_mesh_serves(mesh)

    async def test_swapping_its_socket_for_a_symlink_does_not_redirect_its_calls(
        self, mesh: Mesh
    ) -> None:
        pid = mesh.plugin("intruder").replicas[0].pid
        with contextlib.suppress(SidemeshError):  # its own answer may be cut off
            await _attack(mesh, "hijack")
        for _ in range(5):  # the orchestrator reconnects: still to the intruder's own socket
            assert await _attack(mesh, "whoami") == "intruder"
        status = mesh.plugin("intruder")
        assert status.replicas[0].pid == pid and status.restarts == 0
        await assert_mesh_serves(mesh)


async def test_a_socket_that_is_a_symlink_is_never_dialled(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[IMPOSTOR, TOOLS_DEMO]).start(ready=["tools-demo"])
    status = wait_until(
        lambda: (s := mesh.plugin("impostor")).error and s, 20, "the impostor to be refused"
    )
    assert "is a symbolic link, not the socket the sidecar made" in status.error
    await assert_mesh_serves(mesh)


async def test_mesh_reads_and_listeners_only_where_the_operator_grants_them(
    make_mesh: MakeMesh,
) -> None:
    mesh = make_mesh(
        plugin_dirs=[INTRUDER, TOOLS_DEMO],
        plugins={"intruder": {
            "sandbox": {"allow_network": True, "allow_mesh_listeners": True},
            "permissions": {"tools": ["tools-demo/*"], "mesh": ["read"]},
        }},
    ).start(ready=["intruder", "tools-demo"])  # fmt: skip
    seen = await _attack(mesh, "mesh_api")
    assert seen["ListPlugins"] == "OK" and seen["ListTraces"] == "OK", seen
    port = int(mesh.tcp_address.rpartition(":")[2])
    assert await _attack(mesh, "connect", port=port) == {"ok": True}
