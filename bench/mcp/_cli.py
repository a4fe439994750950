"""The command line of ``python -m bench.mcp``: rounds over the topologies, then the report."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.mcp._load import Measurement, measure
from bench.mcp._report import markdown, summarize
from bench.mcp._topologies import ALL

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mcp",
        description="MCP benchmark: tool calls/s, p50 and gateway CPU per call through "
        "Sidemesh's MCP endpoints (stdio, HTTP), FastMCP's proxy and mcp-proxy, against "
        "calling the FastMCP echo server directly. Writes mcp-latest.{json,md}.",
    )
    parser.add_argument("--smoke", action="store_true", help="every topology for a moment")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; smoke 1)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per slot")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (16)")
    parser.add_argument("--only", nargs="*", choices=sorted(ALL), help="only these topologies")
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.smoke else 3)
    seconds = args.seconds or (1.0 if args.smoke else 10.0)
    warmup = 0.3 if args.smoke else 2.0
    max_calls = 2_000 if args.smoke else 200_000
    names = args.only or list(ALL)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-mcp-")) if args.smoke else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-mcp-work-"))
    os.environ.setdefault("FASTMCP_LOG_LEVEL", "WARNING")  # the echo server and FastMCP's proxy
    t0 = time.monotonic()
    results: list[Measurement] = []
    for round_ in range(rounds):
        order = (
            names if round_ % 2 == 0 else list(reversed(names))
        )  # alternate: no slot is always last
        for name in order:
            slot = work / f"{name}-{round_}"
            slot.mkdir(parents=True)
            topology = ALL[name](slot)
            try:
                topology.start()
                result = asyncio.run(
                    measure(topology, concurrency=args.concurrency, seconds=seconds,
                            warmup=warmup, max_calls=max_calls)
                )  # fmt: skip
            finally:
                topology.stop()
            print(f"round {round_ + 1}/{rounds} {name}: {result.calls_per_s} calls/s, "
                  f"p50 {result.p50_ms} ms, gateway {result.gateway_cpu_ms_per_call} ms CPU/call",
                  file=sys.stderr)  # fmt: skip
            results.append(result)
    summary = summarize(results, concurrency=args.concurrency, seconds=seconds, rounds=rounds)
    (out / "mcp-latest.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "mcp-latest.md").write_text(markdown(summary))
    print((out / "mcp-latest.md").read_text())
    print(f"results: {out / 'mcp-latest.json'} ({time.monotonic() - t0:.0f} s)")
    errors = sum(r.errors for r in results)
    if errors or any(r.calls == 0 for r in results):
        print(f"the benchmark saw {errors} failed calls or a topology with none", file=sys.stderr)
        return 1
    return 0
