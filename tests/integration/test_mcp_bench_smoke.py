"""``python -m bench.mcp --smoke``: the MCP benchmark's harness answers through its topologies
(the FastMCP echo server directly, mcp-proxy, Sidemesh's HTTP endpoint) and writes its results.

The other topologies share the same code paths (a stdio client, a mesh); ``make bench`` and
``python -m bench.mcp`` run them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from meshproc import ROOT

pytestmark = pytest.mark.integration

TOPOLOGIES = ["direct", "mcp-proxy", "sidemesh-http"]


@pytest.mark.timeout(300)  # the first run creates mcp-proxy's virtualenv (pip, from PyPI)
def test_mcp_bench_smoke_writes_results_with_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.mcp", "--smoke", "--out", str(out), "--only", *TOPOLOGIES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "mcp-latest.json").read_text())
    assert set(summary["topologies"]) == set(TOPOLOGIES)
    for name, row in summary["topologies"].items():
        assert row["calls"] > 0 and row["errors"] == 0, name
        assert row["p50_ms"] > 0 and row["vs_direct"] is not None, name
    assert summary["topologies"]["sidemesh-http"]["gateway_cpu_ms_per_call"] > 0
    assert summary["topologies"]["mcp-proxy"]["gateway_cpu_ms_per_call"] > 0
    table = (out / "mcp-latest.md").read_text()
    assert "| sidemesh-http |" in table and "calls/s vs best peer" in table
