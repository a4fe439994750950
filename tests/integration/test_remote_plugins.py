"""Remote plugins: sidecars the mesh routes to but does not launch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from meshproc import EXAMPLE_PLUGINS, Mesh, wait_until

from clients import AsyncMeshClient, UnavailableError
from sidemesh.v1 import mesh_pb2

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sidecar() -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    """Starts tools-demo's sidecar by hand, on a TCP port, as another host would."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ["PATH"], "SIDEMESH_LISTEN": f"127.0.0.1:{port}",
               "SIDEMESH_PLUGIN": "tools-demo", "OTEL_SDK_DISABLED": "true"}  # fmt: skip
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-m", "sidecars.python",
             "tools_demo:app"],
            cwd=EXAMPLE_PLUGINS / "tools-demo", env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


async def test_the_mesh_routes_to_a_remote_sidecar_and_follows_its_health(
    make_mesh: MakeMesh, sidecar: Callable[[int], subprocess.Popen[bytes]]
) -> None:
    port = _free_port()
    remote = sidecar(port)
    mesh = make_mesh(
        plugin_dirs=[], remote_plugins={"tools-demo": {"address": f"127.0.0.1:{port}"}}
    ).start(ready=["tools-demo"])
    status = mesh.plugin("tools-demo")
    assert status.directory == f"remote:127.0.0.1:{port}"
    assert status.replicas[0].pid == 0  # not a process of the mesh
    assert not any(layer.active for layer in status.sandbox)
    async with AsyncMeshClient(mesh.address) as client:
        assert (await client.call_tool("tools-demo/add", a=4, b=5)).structured == {"result": 9}

        remote.send_signal(signal.SIGKILL)
        remote.wait()
        wait_until(
            lambda: mesh.plugin("tools-demo").state != mesh_pb2.PLUGIN_STATE_READY,
            15,
            "the mesh to notice the remote sidecar is gone",
        )
        with pytest.raises(UnavailableError):
            await client.call_tool("tools-demo/add", a=1, b=1)

        sidecar(port)  # it comes back: the mesh reconnects
        mesh.wait_state("tools-demo", "READY")
        assert (await client.call_tool("tools-demo/add", a=1, b=1)).structured == {"result": 2}


def test_a_bad_remote_plugin_is_reported_not_fatal(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(
        plugin_dirs=[str(EXAMPLE_PLUGINS / "tools-demo")],
        remote_plugins={"Bad_Name": {"address": "127.0.0.1:1"}},
    ).start(ready=["tools-demo"])
    status = mesh.plugin("Bad_Name")
    assert status.state == mesh_pb2.PLUGIN_STATE_FAILED
    assert "remote_plugins.Bad_Name" in status.error and "field 'name'" in status.error
