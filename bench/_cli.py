"""The command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench._profile import FULL, SMOKE
from bench._run import run
from bench._validate import validate

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; exit 1 when the outputs fail validation, 2 on bad usage."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Sidemesh benchmark: direct, nginx and orchestrator topologies against one "
        "benchmark sidecar, in alternating rounds. Writes latest.{json,md,png} and "
        "<timestamp>.json.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every topology and phase for a moment (seconds), then validate the outputs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"where results go (default: {RESULTS_DIR}; with --smoke, a temporary directory)",
    )
    parser.add_argument("--rounds", type=int, help="rounds over the topologies (default: 3)")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        profile = replace(profile, rounds=args.rounds)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else RESULTS_DIR)
    t0 = time.monotonic()
    _, path = run(profile, out)
    print((out / "latest.md").read_text())
    problems = validate(out)
    print(f"results: {path} ({time.monotonic() - t0:.0f} s)")
    if problems:
        print("the outputs are not valid:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0
