"""The ``sidemesh`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator.cli import _call, _certs, _inspect, _mcp, _resources, _serve, _traces, _validate
from orchestrator.cli._common import EXIT_CODES_HELP


def build_parser() -> argparse.ArgumentParser:
    """The ``sidemesh`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sidemesh",
        description="Sidemesh: a gRPC service mesh for AI agents, tools and MCP servers.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve.add_parser(sub)
    _inspect.add_parsers(sub)
    _call.add_parsers(sub)
    _resources.add_parsers(sub)
    _traces.add_parsers(sub)
    _validate.add_parser(sub)
    _mcp.add_parser(sub)
    _certs.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
