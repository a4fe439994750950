"""From rounds to results: medians per topology, ratios, goals, and ``latest.md``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from bench._profile import STREAM_SHAPES

#: Metric key -> how to read it from one round of one topology.
_EXTRACT: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "latency_p50_ms": lambda r: r["latency"]["p50_ms"],
    "latency_p99_ms": lambda r: r["latency"]["p99_ms"],
    "rps_h2load": lambda r: r["h2load"].get("requests_per_second"),
    "rps_python": lambda r: r["python"]["rps"],
    "proxy_cpu_us_per_call": lambda r: r["h2load"].get("cpu", {}).get("proxy_cpu_us_per_unit"),
    "sidecar_cpu_us_per_call": lambda r: r["h2load"].get("cpu", {}).get("sidecar_cpu_us_per_unit"),
    "proxy_cpu_us_per_msg": lambda r: r["streams"]["64x16"]["cpu"]["proxy_cpu_us_per_unit"],
    "sidecar_cpu_us_per_msg": lambda r: r["streams"]["64x16"]["cpu"]["sidecar_cpu_us_per_unit"],
    "proxy_cpu_us_per_call_python": lambda r: r["python"]["cpu"]["proxy_cpu_us_per_unit"],
    "host_busy_h2load": lambda r: r["h2load"].get("cpu", {}).get("host_busy"),
    "foreign_max": lambda r: _phase_max(r, "foreign_share"),
    "steal_max": lambda r: _phase_max(r, "steal"),
}
for _size, _streams in STREAM_SHAPES:
    _shape = f"{_size}x{_streams}"
    _EXTRACT[f"msgs_{_shape}"] = lambda r, s=_shape: r["streams"][s]["msgs_per_s"]  # type: ignore[misc]
    _EXTRACT[f"mbps_{_shape}"] = lambda r, s=_shape: r["streams"][s]["mb_per_s"]  # type: ignore[misc]


def _phase_max(r: dict[str, Any], key: str) -> float:
    """The largest ``key`` of the measured windows of one round (steal, others' CPU)."""
    windows = [r.get("h2load", {}).get("cpu", {}), r.get("python", {}).get("cpu", {})]
    windows += [s["cpu"] for s in r.get("streams", {}).values() if isinstance(s, dict)]
    return max(w.get(key) or 0.0 for w in windows)


#: Throughput metrics: higher is better, compared as ratios.
THROUGHPUT = ["rps_h2load", "rps_python"] + [f"msgs_{s}x{n}" for s, n in STREAM_SHAPES]

#: (name, numerator, denominator) of the ratios reported.
RATIOS = (
    ("orchestrator/nginx", "orchestrator", "nginx"),
    ("orchestrator/direct", "orchestrator", "direct"),
    ("nginx/direct", "nginx", "direct"),
    ("tracing on/off", "orchestrator", "tracing_off"),
    ("sandboxed/unsandboxed", "sandboxed", "unsandboxed"),
    ("auth token/off", "auth_token", "orchestrator"),
    ("auth mTLS/off", "auth_mtls", "orchestrator"),
)
#: The auth topologies, each against the same orchestrator with ``auth: {mode: off}``.
AUTH = (("auth_token", "bearer token"), ("auth_mtls", "mTLS"))


def errors_of(round_: dict[str, Any]) -> int:
    """Failed calls and streams in one round of one topology (a failed phase counts 1)."""
    phases = [p for p in ("latency", "h2load", "python", "streams") if p in round_]
    if not phases:
        return 1
    failed = sum(1 for p in phases if "phase_failed" in round_[p])
    if failed:
        return failed
    h2 = round_.get("h2load", {})
    return int(
        round_.get("latency", {}).get("errors", 0)
        + round_.get("python", {}).get("errors", 0)
        + sum(s["errors"] for s in round_.get("streams", {}).values())
        + h2.get("failed", 0)
        + h2.get("errored", 0)
        + h2.get("timeout", 0)
        + (0 if h2.get("bodies_ok", True) else 1)
    )


def medians(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median over rounds of every metric (``None`` when no round has it)."""
    out: dict[str, float | None] = {}
    for key, extract in _EXTRACT.items():
        values = [v for r in rounds if (v := _safe(extract, r)) is not None and math.isfinite(v)]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(errors_of(r) for r in rounds)
    return out


def _safe(extract: Callable[[dict[str, Any]], float | None], r: dict[str, Any]) -> float | None:
    try:
        value = extract(r)
    except (KeyError, TypeError):
        return None
    return float(value) if value is not None else None


def ratios(median: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Each ratio's throughput quotients, latency p50 quotient and added p50 (ms)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, num, den in RATIOS:
        if num not in median or den not in median:
            continue
        a, b = median[num], median[den]
        row: dict[str, float | None] = {m: _div(a.get(m), b.get(m)) for m in THROUGHPUT}
        row["latency_p50"] = _div(a.get("latency_p50_ms"), b.get("latency_p50_ms"))
        p50a, p50b = a.get("latency_p50_ms"), b.get("latency_p50_ms")
        row["added_p50_ms"] = p50a - p50b if p50a is not None and p50b is not None else None
        row["proxy_cpu_per_call"] = _div(
            a.get("proxy_cpu_us_per_call"), b.get("proxy_cpu_us_per_call")
        )
        out[name] = row
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


#: Issue 13's targets (``make bench``, one run): (name, ratio, metric, bound, at least, unit).
TARGETS = (
    ("unary RPS@64 (h2load), orchestrator / nginx", "orchestrator/nginx", "rps_h2load", 0.9,
     True, "x"),
    ("64 B x 16 streams, orchestrator / nginx", "orchestrator/nginx", "msgs_64x16", 1.0,
     True, "x"),
    ("4 KiB x 16 streams, orchestrator / nginx", "orchestrator/nginx", "msgs_4096x16", 1.0,
     True, "x"),
    ("orchestrator CPU per unary call / nginx's", "orchestrator/nginx", "proxy_cpu_per_call",
     1.5, False, "x"),
    ("added p50 over direct, concurrency 1", "orchestrator/direct", "added_p50_ms", 0.3,
     False, "ms"),
    ("tracing on / off, unary RPS (h2load)", "tracing on/off", "rps_h2load", 0.95, True, "x"),
)  # fmt: skip
#: Issue 13's bounds on the idle-streams phase (10,000 streams in the full run).
IDLE_PEAK_MIB = 200
IDLE_KIB_PER_STREAM = 10


def goals(
    r: dict[str, dict[str, float | None]], idle: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Issue 13's targets, each with the measured value and whether it is met."""
    out = [
        _goal(name, r.get(ratio, {}).get(metric), bound, at_least, unit)
        for name, ratio, metric, bound, at_least, unit in TARGETS
    ]
    idle = idle or {}
    n = idle.get("streams_requested")
    peak = idle.get("orchestrator_vmhwm_kib")
    per = idle.get("orchestrator_kib_per_stream")
    out.append(
        _goal(f"{n or '-':,} idle agent streams, orchestrator peak RSS" if n else
              "idle agent streams, orchestrator peak RSS",
              peak / 1024 if peak else None, IDLE_PEAK_MIB, False, "MiB")
    )  # fmt: skip
    out.append(_goal("... per stream over idle", per, IDLE_KIB_PER_STREAM, False, "KiB"))
    return out


def _goal(
    name: str, value: float | None, bound: float, at_least: bool, unit: str
) -> dict[str, Any]:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {
        "goal": name, "value": value, "bound": bound, "met": met, "unit": unit,
        "at_least": at_least,
    }  # fmt: skip


_SUFFIX = {"ms": " ms", "x": "x", "MiB": " MiB", "KiB": " KiB"}


def _goal_value(goal: dict[str, Any]) -> str:
    value, unit = goal["value"], goal.get("unit", "")
    if value is None:
        return "-"
    if unit == "%":
        return f"{value * 100:.0f}%"
    suffix = _SUFFIX.get(unit, "")
    return f"{value:.2f}{suffix}"


# -- Markdown --------------------------------------------------------------------


def _pct(share: float | None, digits: int = 0) -> str:
    return "-" if share is None else f"{share * 100:.{digits}f}%"


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """``latest.md``: the per-topology table, the ratios, the goals and the one-off phases."""
    m = results["machine"]
    p = results["profile"]
    lines = [
        f"# Sidemesh benchmark — {results['timestamp']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_mib']:,} MiB, "
        f"{m['os']}, kernel {m['kernel']}; Python {m['python']}, grpcio {m['grpcio']}, "
        f"nginx {m.get('nginx', '-')}, h2load {m.get('h2load', '-')}. "
        f"Profile `{p['name']}`: {results['rounds_done']} rounds (medians), "
        f"topology order alternating; run took {results['duration_seconds']:.0f} s.",
        "",
        f"Host CPU steal during the run: {results['host']['steal'] * 100:.1f}%"
        + (" — **over 5%: numbers are suspect**" if results["host"]["steal_flag"] else "")
        + f"; CPU used by other processes on the host: "
        f"{results['host']['foreign_cpu_share'] * 100:.0f}% of its cores.",
        "",
        "| topology | p50 ms | p99 ms | RPS@64 h2load | RPS@64 python "
        "| 64 B x1 msgs/s (MB/s) | 64 B x16 | 4 KiB x1 | 4 KiB x16 "
        "| proxy CPU µs/call | proxy CPU µs/msg | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["topologies"].values():
        md = t["median"]
        shapes = [
            f"{_f(md.get(f'msgs_{s}x{n}'))} ({_f(md.get(f'mbps_{s}x{n}'), 2)})"
            for s, n in STREAM_SHAPES
        ]
        lines.append(
            f"| {t['label']} | {_f(md['latency_p50_ms'], 2)} | {_f(md['latency_p99_ms'], 2)} "
            f"| {_f(md['rps_h2load'])} | {_f(md['rps_python'])} | " + " | ".join(shapes) + " | "
            f"{_f(md['proxy_cpu_us_per_call'])} | {_f(md['proxy_cpu_us_per_msg'])} "
            f"| {md['errors']:.0f} |"
        )
    lines += [
        "",
        "CPU µs/call: the forwarding process's user+system CPU (`/proc/<pid>/stat`) during "
        "the h2load window ÷ calls; µs/msg: the same during the 64 B x 16 streams phase ÷ "
        "messages. MB/s counts delta payload bytes (10⁶).",
        "",
        "## CPU per call and per message",
        "",
        "| topology | proxy µs/call | sidecar µs/call | proxy µs/msg | sidecar µs/msg "
        "| host CPU busy during h2load | max CPU of other processes in a phase "
        "| max steal in a phase |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["topologies"].values():
        md = t["median"]
        busy, steal, foreign = (
            md.get("host_busy_h2load"),
            md.get("steal_max"),
            md.get("foreign_max"),
        )
        lines.append(
            f"| {t['label']} | {_f(md['proxy_cpu_us_per_call'])} "
            f"| {_f(md['sidecar_cpu_us_per_call'])} | {_f(md['proxy_cpu_us_per_msg'])} "
            f"| {_f(md['sidecar_cpu_us_per_msg'])} "
            f"| {_pct(busy)} | {_pct(foreign)} | {_pct(steal, 1)} |"
        )
    lines += [
        "",
        "Proxy: the orchestrator process, or nginx's master and worker; sidecar: the "
        "benchmark sidecar's process tree (bwrap included when sandboxed). Other processes: "
        "host CPU time not used by the proxy, the sidecar, the client or h2load, as a share "
        "of all cores (other people's work on a shared machine makes the numbers noisy).",
        "",
        "## Ratios",
        "",
        "| ratio | RPS h2load | RPS python | 64 B x1 | 64 B x16 | 4 KiB x1 | 4 KiB x16 "
        "| p50 latency | added p50 ms | proxy CPU/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["ratios"].items():
        cells = [_f(row.get(metric), 2) for metric in THROUGHPUT]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_f(row.get('latency_p50'), 2)} "
            f"| {_f(row.get('added_p50_ms'), 2)} | {_f(row.get('proxy_cpu_per_call'), 2)} |"
        )
    lines += [
        "",
        "## Targets (issue 13)",
        "",
        "Every figure from this run: throughput ratios are of medians over the rounds, "
        "measured in the same rounds, so the load from other work on the host is shared.",
        "",
        "| figure | measured | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for g in results["goals"]:
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        bound = f"{g['bound']:g}{_SUFFIX.get(g['unit'], '')}"
        sign = "≥" if g.get("at_least", False) else "≤"
        lines.append(f"| {g['goal']} | {_goal_value(g)} | {sign} {bound} | {met} |")
    lines += _auth(results)
    lines += _token_streams(results)
    lines += _one_offs(results)
    return "\n".join(lines) + "\n"


def auth_costs(median: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """What authentication adds per call, each auth topology against ``auth: {mode: off}``."""
    off = median.get("orchestrator")
    out: dict[str, dict[str, float | None]] = {}
    if off is None:
        return out
    for key, _ in AUTH:
        on = median.get(key)
        if on is None:
            continue
        out[key] = {
            "p50_ms": on.get("latency_p50_ms"),
            "added_p50_ms": _sub(on.get("latency_p50_ms"), off.get("latency_p50_ms")),
            "cpu_us_per_call_python": on.get("proxy_cpu_us_per_call_python"),
            "added_cpu_us_per_call_python": _sub(
                on.get("proxy_cpu_us_per_call_python"), off.get("proxy_cpu_us_per_call_python")
            ),
            "rps_python_ratio": _div(on.get("rps_python"), off.get("rps_python")),
            "cpu_us_per_call_h2load": on.get("proxy_cpu_us_per_call"),
            "added_cpu_us_per_call_h2load": _sub(
                on.get("proxy_cpu_us_per_call"), off.get("proxy_cpu_us_per_call")
            ),
            "rps_h2load_ratio": _div(on.get("rps_h2load"), off.get("rps_h2load")),
        }
    return out


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _auth(results: dict[str, Any]) -> list[str]:
    costs = results.get("auth") or {}
    if not costs:
        return []
    off = results["topologies"]["orchestrator"]["median"]
    lines = [
        "",
        "## What authentication costs per call (issue 12)",
        "",
        "Each against the `orchestrator` topology (the same sidecar, tracing on, `auth: {mode: "
        "off}`), in the same rounds. CPU per call: the orchestrator's, with 64 calls in flight "
        "from the Python client (h2load cannot present a client certificate; its figure is "
        "given for the token).",
        "",
        "| auth | p50 ms | added p50 ms | orchestrator CPU µs/call (python@64) "
        "| added CPU µs/call | RPS python vs off | CPU µs/call (h2load) | added (h2load) "
        "| RPS h2load vs off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| off | {_f(off.get('latency_p50_ms'), 2)} | - "
        f"| {_f(off.get('proxy_cpu_us_per_call_python'))} | - | 1 "
        f"| {_f(off.get('proxy_cpu_us_per_call'))} | - | 1 |",
    ]
    for key, label in AUTH:
        c = costs.get(key)
        if c is None:
            continue
        lines.append(
            f"| {label} | {_f(c['p50_ms'], 2)} | {_f(c['added_p50_ms'], 2)} "
            f"| {_f(c['cpu_us_per_call_python'])} | {_f(c['added_cpu_us_per_call_python'])} "
            f"| {_f(c['rps_python_ratio'], 2)} | {_f(c['cpu_us_per_call_h2load'])} "
            f"| {_f(c['added_cpu_us_per_call_h2load'])} | {_f(c['rps_h2load_ratio'], 2)} |"
        )
    return lines


def _token_streams(results: dict[str, Any]) -> list[str]:
    loads = results.get("token_streams") or {}
    if not loads:
        return []
    lines = [
        "",
        "## Slow token streams (issue 13)",
        "",
        "Concurrent agent streams of 16 B deltas (an LLM's tokens), the sidecar pausing "
        "between two, from client processes; measured over a window once all were open. "
        "Inter-token delay: the time between consecutive deltas of a stream at the client "
        "(its floor is the sidecar's pause). Proxy CPU: the forwarding process over the window.",
        "",
        "| load | topology | streams open | tokens/s (of nominal) | inter-token p50 ms | p99 ms "
        "| p99.9 ms | max ms | proxy CPU (cores) | proxy CPU µs/token | sidecar CPU (cores) "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in loads.items():
        for key, run in runs.items():
            gaps = run.get("gaps_ms") or {}
            nominal = run["streams"] / run["delay"]
            lines.append(
                f"| {name} | {key} | {run.get('peak_open_at_once', 0):,} "
                f"| {_f(run.get('tokens_per_s'))} ({_f(nominal)}) "
                f"| {_f(gaps.get('p50'), 1)} | {_f(gaps.get('p99'), 1)} "
                f"| {_f(gaps.get('p999'), 1)} | {_f(gaps.get('max'), 1)} "
                f"| {_f(run.get('proxy_cores'), 2)} | {_f(run.get('proxy_cpu_us_per_token'), 1)} "
                f"| {_f(run.get('sidecar_cores'), 2)} | {run.get('streams_errors', 0)} |"
            )
    return lines


def _one_offs(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Once per run", ""]
    lib = results.get("library") or {}
    for key, row in lib.items():
        lines.append(
            f"- `clients.AsyncMeshClient.call_tool` via {key}: p50 {_f(row['p50_ms'], 2)} ms, "
            f"p99 {_f(row['p99_ms'], 2)} ms ({row['calls']} calls; raw stubs: "
            f"{_f(results['topologies'].get(key, {}).get('median', {}).get('latency_p50_ms'), 2)}"
            " ms)"
        )
    start = results.get("sidecar_start") or {}
    for key in ("sandboxed", "unsandboxed"):
        row = start.get(key)
        if row:
            secs = ", ".join(_f(s * 1e3) for s in row["startup_seconds"])
            rss = ", ".join(_f(b / 2**20, 1) for b in row["rss_bytes"])
            lines.append(
                f"- {key} sidecar (launched by the orchestrator): start-to-ready {secs} ms, "
                f"idle RSS {rss} MiB"
            )
    idle = results.get("idle_streams") or {}
    if idle:
        lines.append(
            f"- idle streams: {idle['streams_ok']:,} of {idle['streams_requested']:,} "
            f"completed, {idle['peak_open_at_once']:,} open at once "
            f"(all open after {_f(idle.get('all_open_after_seconds'), 1)} s); orchestrator "
            f"RSS {idle['orchestrator_rss_before_kib'] / 1024:.0f} MiB before, peak "
            f"{idle['orchestrator_vmhwm_kib'] / 1024:.0f} MiB (VmHWM), i.e. "
            f"{_f(idle.get('orchestrator_kib_per_stream'), 1)} KiB per stream; sidecar peak "
            f"{idle['sidecar_peak_rss_sampled_kib'] / 1024:.0f} MiB; {idle['streams_errors']} "
            "errors"
        )
    skipped = results.get("skipped") or []
    for note in skipped:
        lines.append(f"- skipped: {note}")
    return lines
