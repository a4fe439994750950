"""``python -m bench --smoke``: every benchmark topology for seconds, outputs validated.

This keeps the benchmark harness honest in ``make test``: each topology (direct,
nginx, the orchestrator with tracing on and off, sandboxed and unsandboxed
sidecars, token and mTLS authentication) must answer every phase without an
error, the slow token streams must complete, and the run must write a valid
``latest.json``, ``latest.md`` and ``latest.png``, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from meshproc import ROOT, processes_with, wait_until

pytestmark = pytest.mark.integration

TOPOLOGIES = {
    "direct", "nginx", "orchestrator", "tracing_off", "sandboxed", "unsandboxed",
    "auth_token", "auth_mtls",
}  # fmt: skip


def _installed(command: str) -> bool:
    return shutil.which(command) is not None or os.access(f"/usr/sbin/{command}", os.X_OK)


@pytest.mark.timeout(90)
def test_bench_smoke_runs_every_topology_and_writes_valid_results(tmp_path: Path) -> None:
    missing = [c for c in ("nginx", "h2load") if not _installed(c)]
    assert not missing, f"{', '.join(missing)} not installed: `make test` installs them"
    out = tmp_path / "results"
    # The run's work directory lands in tmp_path too, so leftovers can be found by path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    results = json.loads((out / "latest.json").read_text())
    assert set(results["topologies"]) == TOPOLOGIES
    for key, topology in results["topologies"].items():
        assert topology["median"]["errors"] == 0, key
        assert topology["median"]["latency_p50_ms"] > 0, key
        assert topology["median"]["rps_python"] > 0, key
        if key != "auth_mtls":  # h2load cannot present a client certificate
            assert topology["median"]["rps_h2load"] > 0, key
    # Every target of issue 13 is evaluated; authentication's cost is measured (issue 12).
    assert all(goal["met"] is not None for goal in results["goals"]), results["goals"]
    assert set(results["auth"]) == {"auth_token", "auth_mtls"}
    (load,) = results["token_streams"].values()
    tokens = load["orchestrator"]
    assert tokens["all_completed"] is True
    assert tokens["gaps_ms"]["p99"] > 0 and tokens["proxy_cpu_us_per_token"] > 0
    assert results["remote_plugins"] is True  # direct, nginx and orchestrator share a sidecar
    assert results["idle_streams"]["all_completed"] is True
    assert (out / results["timestamp_file"]).is_file()
    assert "| orchestrator |" in (out / "latest.md").read_text()
    assert (out / "latest.png").read_bytes()[:4] == b"\x89PNG"
    # Every process the run started is gone (nginx workers and sidecars too).
    wait_until(lambda: not processes_with(str(tmp_path)), 10, "the benchmark's processes to exit")
