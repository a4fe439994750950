"""A minimal orchestrator stand-in hosting the native data plane, for ``python -m bench.dataplane``.

``python -m bench._dataplane_host --upstream 127.0.0.1:P [--tracing]`` listens on
127.0.0.1:0, prints ``ready <address>``, and forwards every routed call to the bench
sidecar after a Python decision that does what the router's does per call: parse the
first message with the generated classes, look the target up in a catalog (a dict),
rewrite the target to the plugin-local name, and return a decision with a context.
A thread drains the records every 100 ms; with ``--tracing`` it also hands the span rows
the data plane made (SERVER and CLIENT spans) to the real trace store (SQLite).
On SIGTERM it prints one JSON line: calls decided and the decision's CPU per call.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sidemesh_dataplane as dp

from orchestrator._routes import ROUTES
from orchestrator._trace_store import TraceStore
from sidemesh.v1 import agent_pb2, tool_pb2


def _string_field(number: int, value: str) -> bytes:
    raw = value.encode()
    return bytes([number << 3 | 2, len(raw)]) + raw


class Catalog:
    """The decision: what the router's resolvers do, minus schema validation."""

    def __init__(self) -> None:
        # qualified name -> (plugin, local name, replica key)
        self.tools = {"bench/echo": ("bench", "echo", "bench[0]")}
        self.agents = {"bench/stream": ("bench", "stream", "bench[0]")}
        # The SERVER span's attributes per target, serialized once.
        self.attributes = {
            name: dp.SpanAttributes({"sidemesh.target": name})
            for name in (*self.tools, *self.agents)
        }
        self.retry = dp.RetryPolicy(3)  # never-reached retries only
        self.decide_cpu_ns = 0
        self.calls = 0

    def decide(self, call: dp.Call) -> dp.Decision | dp.Refusal:
        t0 = time.thread_time_ns()
        message = call.message
        try:
            if call.path == "/sidemesh.v1.ToolService/CallTool":
                request = tool_pb2.CallToolRequest.FromString(message or b"")
                entry = self.tools.get(request.tool)
            else:
                invoke = agent_pb2.InvokeRequest.FromString(message or b"")
                entry = self.agents.get(invoke.agent)
            if entry is None:
                return dp.Refusal(5, "no such target")
            plugin, local, replica = entry
            return dp.Decision(
                replica,
                message=(message or b"") + _string_field(1, local),
                context=(plugin, local, call.call_id),
                retry=self.retry,
                span_attributes=self.attributes[f"{plugin}/{local}"],
            )
        finally:
            self.decide_cpu_ns += time.thread_time_ns() - t0
            self.calls += 1

    def retry_pick(self, context: Any, failed: str, reason: str) -> str | None:
        return None

    def upstream_failed(
        self, context: Any, replica: str, detail: str
    ) -> tuple[int, str, bytes | None]:
        return 14, f"plugin {context[0]!r} replica {replica} became unreachable ({detail})", None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._dataplane_host")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--tracing", action="store_true")
    parser.add_argument(
        "--no-store", action="store_true", help="take the span rows but do not store them"
    )
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--upstream-connections", type=int, default=1)
    parser.add_argument("--switch-interval", type=float, default=0.0)
    parser.add_argument(
        "--busy",
        type=float,
        default=0.0,
        help="share of time (0..1) a Python thread runs pure Python in 2 ms bursts, as a busy "
        "asyncio loop would: what decide's wait for the GIL costs",
    )
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    catalog = Catalog()
    plane = dp.DataPlane(
        catalog.decide,
        upstream_failed=catalog.upstream_failed,
        retry_pick=catalog.retry_pick,
        routes=[(r.path, r.kind) for r in ROUTES],
        tracing=args.tracing,
        worker_threads=args.worker_threads,
        upstream_connections=args.upstream_connections,
        max_concurrent_calls=1_000_000,
    )
    plane.set_upstream(
        "bench[0]",
        args.upstream,
        span_attributes={"server.address": args.upstream, "network.transport": "tcp",
                         "sidemesh.plugin": "bench", "sidemesh.replica": 0},
    )  # fmt: skip
    address = plane.listen("127.0.0.1:0", listener_id="clients")
    stopping = threading.Event()
    store = TraceStore(Path(tempfile.mkdtemp()) / "traces.db", 1000) if args.tracing else None
    if args.no_store and store is not None:
        store.close()
        store = None
    cost = {"ns": 0, "records": 0}

    def drain() -> None:
        while not stopping.wait(0.1):
            t0 = time.thread_time_ns()
            records = plane.take_records()  # what events and outlier ejection read
            if args.tracing:
                rows = plane.take_span_rows()
                if rows and store is not None:
                    store.add_own(rows)  # the orchestrator's own rows, as the tracer makes them
            cost["ns"] += time.thread_time_ns() - t0
            cost["records"] += len(records)

    def busy() -> None:
        burst = 0.002
        while not stopping.is_set():
            until = time.perf_counter() + burst
            while time.perf_counter() < until:
                pass
            time.sleep(burst * (1 - args.busy) / args.busy)

    if args.busy > 0:
        threading.Thread(target=busy, daemon=True).start()
    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    print(f"ready {address}", flush=True)
    stopping.wait()
    drainer.join(1)
    stats = plane.stats()
    plane.stop(0.5)
    if store is not None:
        store.close()
    calls = max(catalog.calls, 1)
    decisions = max(stats["decisions"], 1)
    print(json.dumps({
        "calls": catalog.calls,
        "decide_cpu_us_per_call": catalog.decide_cpu_ns / calls / 1000,
        "records": cost["records"],
        "records_cpu_us_per_call": cost["ns"] / max(cost["records"], 1) / 1000,
        "decide_gil_wait_us_per_call": stats["decide_gil_wait_ns"] / decisions / 1000,
        "decide_gil_held_us_per_call": stats["decide_gil_held_ns"] / decisions / 1000,
        "decisions_per_batch": stats["decisions"] / max(stats["decision_batches"], 1),
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
