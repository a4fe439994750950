"""Checks a run's outputs: every topology measured, every number real, no call failed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench._lab import ORDER
from bench._report import RATIOS, THROUGHPUT

#: Metrics every topology must have, as positive finite numbers.
_REQUIRED = ["latency_p50_ms", "latency_p99_ms", "rps_h2load", "rps_python", *THROUGHPUT[2:]]
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
        for metric in _REQUIRED:
            if not _positive(t["median"].get(metric)):
                problems.append(f"{key}: {metric} is {t['median'].get(metric)!r}")
        if key != "direct" and not _positive(t["median"].get("proxy_cpu_us_per_call")):
            problems.append(f"{key}: no proxy CPU per call")
        if t["median"].get("errors"):
            problems.append(f"{key}: {t['median']['errors']} calls or streams failed")
        for i, r in enumerate(t["rounds"]):
            if not r["h2load"].get("bodies_ok"):
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
