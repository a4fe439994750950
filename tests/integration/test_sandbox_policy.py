"""Sandbox policy in a real mesh: strict mode refuses, enforce mode reports, the operator grants."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from meshproc import DEMO_PLUGINS, EXAMPLE_PLUGINS, Mesh

from clients import AsyncMeshClient
from sidemesh.v1 import mesh_pb2

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
TOOLS_DEMO = str(EXAMPLE_PLUGINS / "tools-demo")


def _layers(status: mesh_pb2.PluginStatus) -> dict[str, tuple[bool, str]]:
    return {layer.name: (layer.active, layer.detail) for layer in status.sandbox}


def test_strict_mode_refuses_a_plugin_when_a_layer_is_missing(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(
        plugin_dirs=[TOOLS_DEMO], sandbox={"mode": "strict", "bwrap": "/nonexistent/bwrap"}
    ).start()
    status = mesh.wait_state("tools-demo", "FAILED")
    assert "strict sandbox mode: refusing to start plugin 'tools-demo'" in status.error
    assert "namespaces" in status.error and "bubblewrap" in status.error
    assert mesh.sidecars() == []  # nothing was started


async def test_enforce_mode_runs_without_a_missing_layer_and_says_so(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(plugin_dirs=[TOOLS_DEMO], sandbox={"bwrap": "/nonexistent/bwrap"})
    status = mesh.start(ready=["tools-demo"]).plugin("tools-demo")
    layers = _layers(status)
    assert layers["namespaces"][0] is False
    assert layers["namespaces"][1].startswith("UNAVAILABLE")
    for name in ("rlimits", "landlock", "environment"):
        assert layers[name][0], name  # what the host still provides is applied
    assert "sandbox layer namespaces is UNAVAILABLE" in mesh.log()  # loudly, not silently
    async with AsyncMeshClient(mesh.address) as client:
        assert (await client.call_tool("tools-demo/add", a=2, b=2)).structured == {"result": 4}


def test_the_operator_can_relax_and_tighten_per_plugin(make_mesh: MakeMesh) -> None:
    mesh = make_mesh(
        plugin_dirs=DEMO_PLUGINS,
        plugins={
            "tools-demo": {"sandbox": {"enabled": False}},
            "assistant": {"sandbox": {"memory_mb": 200, "max_processes": 40}},
        },
    ).start(ready=["tools-demo", "assistant"])
    relaxed = _layers(mesh.plugin("tools-demo"))
    assert not any(active for active, _ in relaxed.values())
    assert "the operator disabled the sandbox" in relaxed["namespaces"][1]
    tight = _layers(mesh.plugin("assistant"))
    assert all(active for active, _ in tight.values())
    assert tight["cgroups"][1] == "memory 200 MiB, 40 processes"

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plugins", "-a", mesh.address, "-v"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assistant_row = next(line for line in out.stdout.splitlines() if line.startswith("assistant"))
    assert "namespaces,filesystem,network,rlimits,cgroups,seccomp,landlock,environment" in (
        assistant_row
    )
    assert "sandbox cgroups: on memory 200 MiB, 40 processes" in out.stdout
    assert "sandbox namespaces: OFF off: the operator disabled" in out.stdout
