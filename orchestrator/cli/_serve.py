"""``sidemesh serve``: run the mesh until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator._config import load_config
from orchestrator._logging import configure_logging
from orchestrator._yaml_models import ConfigError
from sidemesh.core import run_loop

if TYPE_CHECKING:  # the orchestrator (gRPC, the data plane, the MCP SDK) loads to serve only
    from orchestrator._orchestrator import Orchestrator

log = logging.getLogger("sidemesh.serve")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``serve``."""
    p = sub.add_parser(
        "serve",
        help="run the mesh (orchestrator and plugin sidecars) until SIGTERM/SIGINT",
        description="Run the mesh: discover plugins, start their sidecars, serve clients. "
        "Without --config, serves the bundled example plugins on the default addresses.",
    )
    p.add_argument("--config", "-c", type=Path, help="sidemesh.yaml (default: built-in defaults)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="address to serve on, host:port or unix:/path (repeatable; replaces the config's)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Loads the config and serves; exit code 2 for a bad config, 1 if serving fails."""
    try:
        config = load_config(args.config)
        if args.listen:
            config = config.model_validate({**config.model_dump(), "listen": args.listen})
    except ConfigError as exc:
        print(f"sidemesh: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    from orchestrator._orchestrator import Orchestrator

    source = str(args.config.resolve()) if args.config else "the Sidemesh config"
    try:
        orchestrator = Orchestrator(config, source=source)
    except ConfigError as exc:  # what only making it finds out: interceptors that do not load
        print(f"sidemesh: {exc}", file=sys.stderr)
        return 2
    try:
        return run_loop(_serve(orchestrator))
    except OSError as exc:
        log.error("%s", exc)
        return 1


async def _serve(orchestrator: Orchestrator) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    shutdown: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("received %s: shutting down gracefully", signal.Signals(signum).name)
            stop.set()
        elif shutdown is not None:  # a second signal: do not wait for calls in flight
            log.warning("received %s again: stopping now", signal.Signals(signum).name)
            shutdown.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await orchestrator.start()
    except BaseException:
        await orchestrator.stop(0)
        raise
    await stop.wait()
    shutdown = asyncio.create_task(orchestrator.stop())
    try:
        await shutdown
    except asyncio.CancelledError:
        await orchestrator.stop(0)
    return 0
