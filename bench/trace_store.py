"""``python -m bench.trace_store``: the trace store's writer CPU per call, replaying span rows.

Feeds :meth:`orchestrator._trace_store.TraceStore.add_own` with rows shaped
like the data plane's (a SERVER and a CLIENT span per call, their attributes
as the data plane writes them) in batches every 50 ms, as ``Accounting``
drains them, at ``--rate`` calls/s for ``--seconds``; then waits for the
writer and reports its thread's CPU (``/proc/self/task/<tid>/stat``) per call.
The rows are made before the clock starts, so only the store is measured.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator._trace_store import OwnRow, TraceStore

#: Batches per second, as ``Accounting`` drains the data plane (every 50 ms).
DRAINS = 20
_COMMON = '"rpc.system":"grpc","rpc.service":"sidemesh.v1.ToolService","rpc.method":"CallTool"'


def call_rows() -> list[OwnRow]:
    """The two span rows of one forwarded ``CallTool``."""
    trace, server, client = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(8)
    now = time.time_ns()
    common = f'{_COMMON},"sidemesh.call_id":"{secrets.token_hex(8)}"'
    name, service = "sidemesh.v1.ToolService/CallTool", "sidemesh-orchestrator"
    return [
        (trace, server, "", name, service, 2, now, now + 500_000, 0, "",
         "{" + common + ',"sidemesh.target":"bench/echo","sidemesh.principal":"anonymous",'
         '"rpc.grpc.status_code":"0","sidemesh.messages.sent":"1"}'),
        (trace, client, server, name, service, 3, now + 1_000, now + 400_000, 0, "",
         "{" + common + ',"server.address":"127.0.0.1:5000","sidemesh.replica":"0",'
         '"rpc.grpc.status_code":"0","sidemesh.messages.sent":"1",'
         '"sidemesh.attempt.outcome":"ok"}'),
    ]  # fmt: skip


def _thread_cpu(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replay(rate: int, seconds: float, max_traces: int = 1000) -> dict[str, float]:
    """Replays ``rate`` calls/s for ``seconds``; the writer's CPU per call and its share."""
    per_batch = max(1, rate // DRAINS)
    batches = [
        [row for _ in range(per_batch) for row in call_rows()] for _ in range(int(seconds * DRAINS))
    ]
    with tempfile.TemporaryDirectory() as directory:
        store = TraceStore(Path(directory) / "traces.db", max_traces=max_traces)
        writer = store._writer.native_id
        assert writer is not None
        time.sleep(0.2)
        cpu0, t0 = _thread_cpu(writer), time.monotonic()
        for rows in batches:
            store.add_own(rows)
            time.sleep(1 / DRAINS)
        store.flush(60)
        cpu, wall = _thread_cpu(writer) - cpu0, time.monotonic() - t0
        store.close()
    calls = per_batch * len(batches)
    return {"calls": calls, "writer_cpu_us_per_call": cpu / calls * 1e6, "core_share": cpu / wall}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``--repeat`` replays and prints each."""
    parser = argparse.ArgumentParser(prog="python -m bench.trace_store", description=__doc__)
    parser.add_argument("--rate", type=int, default=3000, help="calls per second")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for _ in range(args.repeat):
        r = replay(args.rate, args.seconds)
        print(
            f"{r['calls']:,} calls at {args.rate:,}/s: trace store writer "
            f"{r['writer_cpu_us_per_call']:.1f} µs of CPU per call, "
            f"{r['core_share'] * 100:.1f}% of a core",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
