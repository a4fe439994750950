"""``python -m bench.chaos``: the chaos figures, to ``bench/results/chaos-latest.{json,md}``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.chaos._mesh import ChaosMesh
from bench.chaos._scenario import Report, run_kills, run_restarts

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="idempotent unary calls")
    parser.add_argument("--kill-every", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--rate", type=float, default=40.0, help="unary calls started per second")
    parser.add_argument("--restarts", type=int, default=100, help="restarts to see under load")
    parser.add_argument("--restart-kill-every", type=float, default=0.3)
    parser.add_argument("--sandbox", choices=["enforce", "off"], default="enforce")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sidemesh-chaos-") as tmp:
        mesh = ChaosMesh(Path(tmp), sandbox={"mode": args.sandbox})
        try:
            mesh.start()
            mesh.wait_ready()
            kills = asyncio.run(
                run_kills(
                    mesh.address, calls=args.calls, kill_every=args.kill_every, rate=args.rate
                )
            )
            restarts = asyncio.run(
                run_restarts(
                    mesh.address, restarts=args.restarts, kill_every=args.restart_kill_every
                )
            )
        finally:
            mesh.close()
    results = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.chaos " + " ".join(argv or sys.argv[1:]),
        "kills": kills.as_dict(),
        "restarts": restarts.as_dict(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "chaos-latest.md").write_text(_markdown(results, kills, restarts))
    print(_markdown(results, kills, restarts))
    ok = (
        not kills.unary_failures and not kills.streams_truncated and not kills.hangs
        and not kills.streams_other_failures and not kills.streams_unavailable_not_on_killed
        and restarts.sigsegv == 0 and restarts.restarts >= args.restarts
    )  # fmt: skip
    return 0 if ok else 1


def _markdown(results: dict[str, object], kills: Report, restarts: Report) -> str:
    on_killed = kills.streams_unavailable - kills.streams_unavailable_not_on_killed
    samples = "".join(f"- {s}\n" for s in (kills.unary_failure_samples
                                            + restarts.unary_failure_samples)[:10])  # fmt: skip
    return f"""# Chaos run ({results["when"]})

`{results["command"]}`: 3 replicas of `tests/plugins/chaos`, sandboxed.

## One replica SIGKILLed every few seconds, under load

| what | figure |
|---|---:|
| idempotent unary calls (`chaos/echo`, 16 at a time) | {kills.unary_calls} |
| ... that failed | {sum(kills.unary_failures.values())} {kills.unary_failures or ""} |
| agent streams | {kills.streams} |
| ... complete | {kills.streams_ok} |
| ... UNAVAILABLE, in flight on a killed replica | {on_killed} |
| ... UNAVAILABLE, not on a killed replica | {kills.streams_unavailable_not_on_killed} |
| ... silently truncated (ended OK, incomplete) | {kills.streams_truncated} |
| ... other failures | {kills.streams_other_failures or 0} |
| hangs (deadline exceeded) | {kills.hangs} |
| replicas killed / restarted | {len(kills.kills)} / {kills.restarts} |
| seconds | {kills.seconds:.0f} |

## Restarts under load

| what | figure |
|---|---:|
| restarts seen | {restarts.restarts} |
| replicas killed | {len(restarts.kills)} |
| exits by reason | {restarts.exits} |
| exits by SIGSEGV | {restarts.sigsegv} |
| unary calls / failed | {restarts.unary_calls} / {sum(restarts.unary_failures.values())} |
| seconds | {restarts.seconds:.0f} |

Failed unary calls (first ten):

{samples or "none"}
"""


if __name__ == "__main__":
    sys.exit(main())
