"""A client in another language (Node.js, @grpc/grpc-js) uses the mesh and joins its traces."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
from meshproc import EXAMPLE_PLUGINS, ROOT, Mesh, wait_until

pytestmark = pytest.mark.integration


async def test_the_node_example_calls_tools_streams_an_agent_and_sees_status_codes(
    make_mesh: Callable[..., Mesh],
) -> None:
    node = shutil.which("node")
    assert node, "node is part of this machine kind (make setup needs it for npm ci)"
    mesh = make_mesh(
        plugin_dirs=[str(EXAMPLE_PLUGINS / "tools-demo"), str(EXAMPLE_PLUGINS / "assistant")]
    )
    mesh.start(ready=["tools-demo", "assistant"])
    out = await asyncio.to_thread(
        subprocess.run, [node, str(ROOT / "clients" / "node" / "example.mjs"), mesh.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tools-demo/add" in out.stdout.splitlines()[0]
    assert 'tools-demo/add -> {"result":42}' in out.stdout
    assert "assistant: 2 + 3 = 5" in out.stdout
    assert "AGENT_RESULT_STATUS_COMPLETED" in out.stdout
    assert "tools-demo/nope -> NOT_FOUND: no tool named 'tools-demo/nope'" in out.stdout
    trace_id = re.search(r"^trace ([0-9a-f]{32})$", out.stdout, re.M)
    assert trace_id, out.stdout

    def spans() -> list[str]:
        command = [sys.executable, "-m", "orchestrator.cli", "trace", trace_id.group(1)]
        listing = subprocess.run(
            [*command, "-a", mesh.address], capture_output=True, text=True, timeout=30
        )
        return [line for line in listing.stdout.splitlines() if "(server)" in line]

    # The mesh continued the client's trace: its calls' server spans, in several processes.
    servers = wait_until(lambda: len(spans()) >= 4 and spans(), 15, "the node client's trace")
    assert any("assistant" in line for line in servers)
