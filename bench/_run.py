"""A whole benchmark run: start the lab, measure in alternating rounds, write the results."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import _report
from bench._chart import draw
from bench._h2load import h2load_binary, h2load_version
from bench._host import machine_info
from bench._idle import run_idle_streams
from bench._lab import ORDER, Lab, Topology
from bench._nginx import nginx_binary
from bench._phases import Tools, measure_round
from bench._proc import HostCpu, own_cpu_seconds
from bench._profile import Profile
from bench._token_streams import run_token_streams
from bench._unary import Latency, clients_latency, echo_request, grpc_frame

#: A run whose host CPU steal exceeds this share is flagged.
STEAL_FLAG = 0.05


def log(message: str) -> None:
    """Progress on stderr, with the time since the run started."""
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


def round_orders(keys: list[str], rounds: int) -> list[list[str]]:
    """Topology order per round: as given, reversed, as given, … (each topology is first once)."""
    return [keys if r % 2 == 0 else list(reversed(keys)) for r in range(rounds)]


def _summary(key: str, r: dict[str, Any]) -> str:
    failed = [
        f"{p} FAILED: {v['phase_failed']}"
        for p, v in r.items()
        if isinstance(v, dict) and "phase_failed" in v
    ]
    if failed:
        return f"{key}: " + "; ".join(failed)
    parts = [f"p50 {r['latency']['p50_ms']:.2f} ms"] if "latency" in r else []
    if "h2load" in r:
        parts.append(f"h2load {r['h2load'].get('requests_per_second', 0):,.0f} rps")
    if "python" in r:
        parts.append(f"python {r['python']['rps']:,.0f} rps")
    if "streams" in r:
        parts.append(f"64Bx16 {r['streams']['64x16']['msgs_per_s']:,.0f} msg/s")
    return f"{key}: {', '.join(parts)} ({r['seconds']:.0f} s)"


def run(profile: Profile, out_dir: Path) -> tuple[dict[str, Any], Path]:
    """Runs the benchmark; writes the results into ``out_dir``; returns them and the JSON path."""
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    host_start = HostCpu.read()
    cpu_start = own_cpu_seconds()
    workdir = Path(tempfile.mkdtemp(prefix="sidemesh-bench-"))
    nginx, h2load = nginx_binary(), h2load_binary()
    tools_versions = {"h2load": h2load_version(h2load) if h2load else "not installed"}
    skipped: list[str] = []
    if nginx is None:
        skipped.append("nginx topology: nginx is not installed (scripts/system-deps.sh bench)")
    if h2load is None:
        skipped.append("RPS@64 h2load: h2load is not installed (scripts/system-deps.sh bench)")
    body = workdir / "callTool.bin"
    body.write_bytes(grpc_frame(echo_request().SerializeToString()))
    tools = Tools(h2load=h2load, body_file=body)
    lab = Lab(workdir, nginx)
    results: dict[str, Any] = {}
    try:
        log(f"starting the lab in {workdir} (remote_plugins: {lab.remote})")
        lab.start(profile.parallel_start, profile.idle_own_orchestrator)
        sidecar_start = lab.sidecar_start()
        topologies = {t.key: t for t in lab.topologies()}
        tools_versions["nginx"] = lab.nginx.version if lab.nginx else "not installed"
        keys = [k for k in ORDER if k in topologies]
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        orders = round_orders(keys, profile.rounds)
        rounds_started = time.monotonic()
        done = 0
        for i, order in enumerate(orders):
            spent = time.monotonic() - rounds_started
            if done and spent + spent / done > profile.rounds_budget:
                skipped.append(
                    f"rounds {i + 1}-{len(orders)}: they would not fit the rounds budget of "
                    f"{profile.rounds_budget:.0f} s (one round took {spent / done:.0f} s)"
                )
                break
            log(f"round {i + 1}/{len(orders)}: {' → '.join(order)}")
            for key in order:
                r = measure_round(topologies[key], profile, tools)
                r["position"] = order.index(key)
                rounds[key].append(r)
                log("  " + _summary(key, r))
            done += 1
        library = _library(topologies, profile)
        tokens: dict[str, dict[str, Any]] = {}
        for plan in profile.tokens:
            for key in profile.token_topologies:
                if key in topologies:
                    log(f"slow token streams, {plan.name}, through {key}: {plan}")
                    run_ = run_token_streams(topologies[key], plan)
                    tokens.setdefault(plan.name, {})[key] = run_
                    log("  " + _token_summary(run_))
        log("idle streams: " + str(profile.idle))
        idle = _idle_streams(lab, profile)
        log(
            f"  {idle['streams_ok']} of {idle['streams_requested']} completed, peak open "
            f"{idle['peak_open_at_once']}, orchestrator VmHWM {idle['orchestrator_vmhwm_kib']} KiB"
        )
        results = {
            "nginx_error_log": lab.nginx.error_log() if lab.nginx else "",
            "topologies": {
                k: {
                    "label": topologies[k].label,
                    "notes": topologies[k].notes,
                    "extra": topologies[k].extra,
                    "phases": list(topologies[k].phases),
                    "median": _report.medians(rounds[k]),
                    "rounds": rounds[k],
                }
                for k in keys
            },
            "orders": orders[:done],
            "rounds_done": done,
            "library": library,
            "sidecar_start": sidecar_start,
            "idle_streams": idle,
            "token_streams": tokens,
        }
    finally:
        log("stopping the lab")
        lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    host = HostCpu.read().since(host_start)
    # Every process the run started has been reaped by now, so its CPU is in os.times().
    mine = own_cpu_seconds() - cpu_start
    foreign = max(host["used_cpu_seconds"] - mine, 0.0)
    cores = os.cpu_count() or 1
    medians = {k: t["median"] for k, t in results["topologies"].items()}
    ratios = _report.ratios(medians)
    results.update(
        {
            "timestamp": started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "profile": profile.as_dict(),
            "machine": machine_info(tools_versions),
            "remote_plugins": lab.remote,
            "host": {
                "steal": host["steal"],
                "steal_flag": host["steal"] > STEAL_FLAG,
                "busy": host["busy"],
                "benchmark_cpu_seconds": mine,
                "foreign_cpu_seconds": foreign,
                "foreign_cpu_share": foreign / max(host["wall_seconds"] * cores, 1e-9),
            },
            "ratios": ratios,
            "goals": _report.goals(ratios, results.get("idle_streams")),
            "auth": _report.auth_costs(medians),
            "skipped": skipped,
            "duration_seconds": time.monotonic() - t0,
        }
    )
    log(f"writing the results to {out_dir}")
    return results, _write(results, out_dir, started_at)


def _token_summary(run: dict[str, Any]) -> str:
    if "gaps_ms" not in run:
        return f"{run['streams_ok']} of {run['streams']} ok; {run.get('window_missed', '')}"
    return (
        f"{run['streams_ok']} of {run['streams']} ok, {run['tokens_per_s']:,.0f} tokens/s, "
        f"p99 gap {run['gaps_ms']['p99']:.1f} ms, proxy {run['proxy_cores'] or 0:.2f} cores"
    )


def _library(topologies: dict[str, Topology], profile: Profile) -> dict[str, Any]:
    """The ``clients`` library's latency, once, via the orchestrator and directly."""
    out: dict[str, Any] = {}
    for key in ("orchestrator", "direct"):
        if key not in topologies:
            continue
        lat: Latency = asyncio.run(
            clients_latency(topologies[key].address, profile.library_calls, 20, time_limit=60.0)
        )
        out[key] = {
            "p50_ms": lat.percentile(50) * 1e3,
            "p99_ms": lat.percentile(99) * 1e3,
            "calls": len(lat.seconds),
            "errors": lat.errors,
        }
        log(f"clients library via {key}: p50 {out[key]['p50_ms']:.2f} ms")
    return out


def _idle_streams(lab: Lab, profile: Profile) -> dict[str, Any]:
    orchestrator = lab.idle_orchestrator
    launched = orchestrator.sidecar_pids()
    sidecar = lab.sidecar.pid if lab.remote else (launched[0] if launched else None)
    idle = run_idle_streams(orchestrator.address, orchestrator.pid, sidecar, profile.idle)
    grown = idle["orchestrator_vmhwm_kib"] - idle["orchestrator_rss_before_kib"]
    idle["orchestrator_kib_per_stream"] = grown / max(idle["peak_open_at_once"], 1)
    idle["same_sidecar"] = lab.remote
    idle["own_orchestrator"] = profile.idle_own_orchestrator
    return idle


def _write(results: dict[str, Any], out_dir: Path, started_at: datetime) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    results["timestamp_file"] = f"{stamp}.json"
    text = json.dumps(results, indent=1, sort_keys=False, default=str)
    (out_dir / f"{stamp}.json").write_text(text)
    (out_dir / "latest.json").write_text(text)
    (out_dir / "latest.md").write_text(_report.markdown(results))
    draw(results, out_dir / "latest.png")
    return out_dir / "latest.json"
