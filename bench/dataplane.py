"""The native data plane measured against the direct call and nginx, in one run.

``python -m bench.dataplane [--rounds 3] [--quick]``: until the data plane is wired into
the orchestrator, the harness cannot start it as an orchestrator; this runs a minimal
Python process hosting it (``bench._dataplane_host``: a realistic Python decision, the
records drained into the real trace store with tracing on) in front of the same bench
sidecar as ``direct`` and ``nginx``, in alternating rounds, and prints the medians:

- h2load RPS@64 (1 connection x 64 streams, ``CallTool(bench/echo)``), with the
  proxy's CPU per call from /proc over the measured window;
- p50/p99 latency of sequential calls (concurrency 1) with the grpc.aio stubs;
- 64 B x 16 agent streams, messages/s;
- once: 2,000 idle agent streams through the data plane, its RSS before and at peak.

Every loop is bounded in count and time; every process is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._dial import Dial
from bench._h2load import h2load_binary, run_h2load
from bench._idle import IdlePlan, run_idle_streams
from bench._nginx import Nginx, nginx_binary
from bench._proc import cpu_seconds
from bench._process import Process
from bench._sidecar import BenchSidecar
from bench._streams import stream_throughput
from bench._unary import echo_request, grpc_frame, unary_latency, verify_body


class Host(Process):
    """``python -m bench._dataplane_host``: the data plane in a Python process."""

    def __init__(self, workdir: Path, upstream: str, name: str, *extra: str) -> None:
        root = Path(__file__).resolve().parent.parent
        argv = [sys.executable, "-m", "bench._dataplane_host", f"--upstream={upstream}", *extra]
        super().__init__(name, argv, workdir / f"{name}.log", cwd=root)
        self.address = ""

    def start_and_wait(self, timeout: float = 20.0) -> None:
        self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            for line in self.log_tail(5).splitlines():
                if line.startswith("ready "):
                    self.address = line.split()[1]
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start:\n{self.log_tail()}")

    def summary(self) -> dict[str, Any]:
        for line in reversed(self.log_tail(5).splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}


def measure(address: str, pids: list[int], body: Path, quick: bool) -> dict[str, Any]:
    """One round of one topology."""
    h2load = h2load_binary()
    assert h2load is not None, "h2load is not installed (scripts/system-deps.sh bench)"
    out: dict[str, Any] = {}
    response_bytes = asyncio.run(verify_body(Dial(address), body.read_bytes()))
    warmup, duration = (0.3, 1.0) if quick else (1.0, 4.0)
    cpu: dict[str, float] = {}

    def open_window() -> None:
        cpu["start"] = cpu_seconds(pids)

    timer = threading.Timer(warmup, open_window)
    timer.start()
    result = run_h2load(h2load, address, body, connections=1, streams=64, duration=duration,
                        warmup=warmup, response_bytes=response_bytes)  # fmt: skip
    timer.join()
    used = cpu_seconds(pids) - cpu.get("start", 0.0)
    out["rps64"] = result.requests_per_second
    out["h2load_ok"] = result.bodies_ok and result.failed == 0 and result.errored == 0
    out["proxy_cpu_us_per_call"] = used / max(result.succeeded, 1) * 1e6 if pids else 0.0
    calls, warm = (200, 20) if quick else (2000, 200)
    latency = asyncio.run(unary_latency(Dial(address), calls, warm, 60))
    out["p50_ms"] = latency.percentile(50) * 1000
    out["p99_ms"] = latency.percentile(99) * 1000
    out["latency_errors"] = latency.errors
    count = 200 if quick else 1500
    streams = asyncio.run(stream_throughput(Dial(address), 16, count, 64, 60))
    out["stream64x16_msgs"] = streams.messages_per_second
    out["stream_errors"] = streams.errors
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--idle-streams", type=int, default=2000)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
    started = time.monotonic()
    sidecar = BenchSidecar(workdir)
    processes: list[Process] = [sidecar]
    results: dict[str, list[dict[str, Any]]] = {}
    idle: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    try:
        sidecar.start_and_wait()
        nginx_path = nginx_binary()
        assert nginx_path is not None, "nginx is not installed (scripts/system-deps.sh bench)"
        nginx = Nginx(nginx_path, workdir, sidecar.address)
        processes.append(nginx)
        nginx.start_and_wait()
        threads = f"--worker-threads={args.worker_threads}"
        traced = Host(workdir, sidecar.address, "dataplane", "--tracing", threads)
        untraced = Host(workdir, sidecar.address, "dataplane_tracing_off", threads)
        for host in (traced, untraced):
            processes.append(host)
            host.start_and_wait()
        topologies = {
            "direct": (sidecar.address, []),
            "nginx": (nginx.address, nginx.pids()),
            "dataplane": (traced.address, [traced.pid]),
            "dataplane_tracing_off": (untraced.address, [untraced.pid]),
        }
        body = workdir / "body.bin"
        body.write_bytes(grpc_frame(echo_request().SerializeToString()))
        order = list(topologies)
        for round_ in range(args.rounds):
            for key in order if round_ % 2 == 0 else order[::-1]:
                address, pids = topologies[key]
                results.setdefault(key, []).append(measure(address, pids, body, args.quick))
                print(f"round {round_ + 1} {key}: {results[key][-1]}", file=sys.stderr, flush=True)
        if args.idle_streams:
            # A fresh process, so that its RSS before the phase is an idle data plane's.
            fresh = Host(workdir, sidecar.address, "dataplane_idle", threads)
            processes.append(fresh)
            fresh.start_and_wait()
            plan = IdlePlan(
                streams=args.idle_streams,
                processes=2,
                channels_per_process=4,
                count=3,
                delay=3.0 if args.quick else 12.0,
                time_limit=120.0,
                window=200,
            )
            idle = run_idle_streams(fresh.address, fresh.pid, sidecar.pid, plan)
        for host in (traced, untraced):
            host.stop()
            summaries[host.name] = host.summary()
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {
        key: {
            m: statistics.median(r[m] for r in rounds)
            for m in rounds[0]
            if isinstance(rounds[0][m], float)
        }
        for key, rounds in results.items()
    }
    nginx_m, dp_m, off_m = medians["nginx"], medians["dataplane"], medians["dataplane_tracing_off"]
    direct_m = medians["direct"]
    ratios = {
        "unary_rps64_vs_nginx": dp_m["rps64"] / nginx_m["rps64"],
        "unary_rps64_tracing_off_vs_nginx": off_m["rps64"] / nginx_m["rps64"],
        "stream64x16_vs_nginx": dp_m["stream64x16_msgs"] / nginx_m["stream64x16_msgs"],
        "cpu_per_call_vs_nginx": dp_m["proxy_cpu_us_per_call"] / nginx_m["proxy_cpu_us_per_call"],
        "added_p50_ms_over_direct": dp_m["p50_ms"] - direct_m["p50_ms"],
        "nginx_added_p50_ms_over_direct": nginx_m["p50_ms"] - direct_m["p50_ms"],
        "tracing_on_vs_off_rps64": dp_m["rps64"] / off_m["rps64"],
    }
    if idle:
        before, peak = (
            idle["orchestrator_rss_before_kib"],
            idle["orchestrator_peak_rss_sampled_kib"],
        )
        idle["rss_per_stream_bytes"] = (peak - before) * 1024 / max(idle["peak_open_at_once"], 1)
    report = {"medians": medians, "ratios": ratios, "idle_streams": idle, "hosts": summaries,
              "rounds": args.rounds, "quick": args.quick, "seconds": time.monotonic() - started,
              "per_round": results}  # fmt: skip
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    ok = all(r["h2load_ok"] and not r["latency_errors"] and not r["stream_errors"]
             for rounds in results.values() for r in rounds)  # fmt: skip
    return 0 if ok and (not idle or idle.get("all_completed")) else 1


if __name__ == "__main__":
    sys.exit(main())
