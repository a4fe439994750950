"""Checks a run's outputs: every topology measured, every number real, no call failed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench._lab import ORDER
from bench._report import RATIOS, THROUGHPUT

#: Metrics a topology must have for each phase it measured, as positive finite numbers.
_REQUIRED = {
    "latency": ["latency_p50_ms", "latency_p99_ms"],
    "h2load": ["rps_h2load"],
    "python": ["rps_python"],
    "streams": THROUGHPUT[2:],
}
_PNG = b"\x89PNG\r\n\x1a\n"


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def validate(directory: Path) -> list[str]:
    """Problems with ``latest.json``, ``latest.md`` and ``latest.png`` in ``directory``."""
    problems: list[str] = []
    try:
        results = json.loads((directory / "latest.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"latest.json: {exc}"]
    topologies = results.get("topologies", {})
    for key in ORDER:
        if key not in topologies:
            problems.append(f"topology {key} was not measured")
            continue
        t = topologies[key]
        phases = t.get("phases") or list(_REQUIRED)
        for metric in (m for p in phases for m in _REQUIRED[p]):
            if not _positive(t["median"].get(metric)):
                problems.append(f"{key}: {metric} is {t['median'].get(metric)!r}")
        cpu = "proxy_cpu_us_per_call" if "h2load" in phases else "proxy_cpu_us_per_call_python"
        if key != "direct" and not _positive(t["median"].get(cpu)):
            problems.append(f"{key}: no proxy CPU per call")
        if t["median"].get("errors"):
            problems.append(f"{key}: {t['median']['errors']} calls or streams failed")
        for i, r in enumerate(t["rounds"]):
            if "h2load" in phases and not r["h2load"].get("bodies_ok"):
                problems.append(f"{key} round {i}: h2load responses were not all good")
    for name, _, _ in RATIOS:
        if name not in results.get("ratios", {}):
            problems.append(f"ratio {name} is missing")
    if not results.get("goals"):
        problems.append("no goals evaluated")
    machine = results.get("machine", {})
    for field in ("cpu_model", "cores", "kernel", "python", "grpcio"):
        if not machine.get(field):
            problems.append(f"machine info lacks {field}")
    if not isinstance(results.get("host", {}).get("steal"), int | float):
        problems.append("host CPU steal was not measured")
    idle = results.get("idle_streams") or {}
    if not idle.get("all_completed"):
        problems.append(f"idle streams did not all complete: {idle}")
    if not _positive(idle.get("orchestrator_vmhwm_kib")):
        problems.append("idle streams: no orchestrator peak RSS")
    loads = results.get("token_streams") or {}
    if not loads or any("orchestrator" not in runs for runs in loads.values()):
        problems.append("slow token streams were not measured through the orchestrator")
    for key, run in ((f"{n}, {k}", r) for n, runs in loads.items() for k, r in runs.items()):
        if not run.get("all_completed"):
            problems.append(f"slow token streams via {key} did not all complete: "
                            f"{run.get('streams_ok')} of {run.get('streams')}, "
                            f"{run.get('first_errors')}")  # fmt: skip
        if not _positive((run.get("gaps_ms") or {}).get("p99")):
            problems.append(f"slow token streams via {key}: no inter-token delay measured "
                            f"({run.get('window_missed', '')})")  # fmt: skip
    for key in ("auth_token", "auth_mtls"):
        if key not in (results.get("auth") or {}):
            problems.append(f"authentication cost {key} was not measured")
    start = results.get("sidecar_start") or {}
    for key in ("sandboxed", "unsandboxed"):
        row = start.get(key) or {}
        if not row.get("startup_seconds") or not all(map(_positive, row["startup_seconds"])):
            problems.append(f"{key} sidecar: no start-to-ready time")
        if not row.get("rss_bytes") or not all(map(_positive, row["rss_bytes"])):
            problems.append(f"{key} sidecar: no idle RSS")
    for key, row in (results.get("library") or {}).items():
        if not _positive(row.get("p50_ms")) or row.get("errors"):
            problems.append(f"clients library via {key}: {row}")
    md = (directory / "latest.md").read_text() if (directory / "latest.md").is_file() else ""
    if "| topology |" not in md or "## Ratios" not in md:
        problems.append("latest.md lacks the tables")
    png = directory / "latest.png"
    if not png.is_file() or png.read_bytes()[:8] != _PNG:
        problems.append("latest.png is not a PNG")
    stamp = results.get("timestamp_file")
    if not stamp or not (directory / stamp).is_file():
        problems.append(f"the per-run copy {stamp!r} is missing")
    return problems
