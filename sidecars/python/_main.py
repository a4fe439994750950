"""Loads the plugin app named on the command line and serves it."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from plugins_sdk import Plugin, run
from sidecars._logging import LOG_LEVEL_ENV, configure_logging
from sidecars._telemetry import configure_tracing
from sidemesh.core import SidecarEnv, normalize_address

log = logging.getLogger("sidecars.python")

LISTEN_ENV, PLUGIN_ENV = SidecarEnv.LISTEN, SidecarEnv.PLUGIN

#: Exit status when the sidecar cannot start: bad usage, or an app that cannot be loaded.
EXIT_UNUSABLE = 2
_USAGE = (
    "usage: python -m sidecars.python [--describe] MODULE:ATTR  (run in the plugin's directory;"
    " --describe prints what the code states about the plugin, as JSON, and serves nothing)"
)


class LoadError(Exception):
    """The app named ``MODULE:ATTR`` cannot be loaded; the message says why and what to do."""


def load_app(target: str, directory: str) -> Plugin:
    """Imports ``MODULE:ATTR`` from ``directory`` and returns the ``Plugin`` found there."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"{target!r} is not MODULE:ATTR, e.g. tools_demo:app")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise LoadError(
                f"cannot import {module_name!r}: no such module in {directory} "
                f"(is 'app' in plugin.yaml right, and the working directory the plugin's?)"
            ) from None
        raise LoadError(_import_failed(module_name, exc)) from None
    except Exception as exc:
        raise LoadError(_import_failed(module_name, exc)) from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        found = [name for name, value in vars(module).items() if isinstance(value, Plugin)]
        hint = f"; its Plugin objects: {', '.join(found)}" if found else ""
        raise LoadError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if not isinstance(app, Plugin):
        raise LoadError(
            f"{target} is a {type(app).__name__}, not a plugins_sdk.Plugin; "
            "point 'app' in plugin.yaml at the object made with Plugin(...)"
        )
    return app


def _import_failed(module_name: str, exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {where.filename}:{where.lineno}" if where else ""
    return f"importing {module_name!r} raised {type(exc).__name__}: {exc}{at}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the sidecar; returns the process's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    configure_logging(os.environ.get(LOG_LEVEL_ENV))
    if args[:1] == ["--describe"] and len(args) == 2:
        return _describe(args[1])
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        normalize_address(os.environ.get(LISTEN_ENV, ""))
    except ValueError as exc:
        print(f"sidecar: {LISTEN_ENV} is unusable: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        app = load_app(args[0], os.getcwd())
    except LoadError as exc:
        print(f"sidecar: cannot load the plugin app: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    expected = os.environ.get(PLUGIN_ENV)
    if expected and expected != app.name:
        log.warning("the app is named %r but %s is %r", app.name, PLUGIN_ENV, expected)
    tracing = configure_tracing(expected or app.name)
    try:
        run(app)  # returns once calls have drained, after Shutdown or SIGTERM
    except OSError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        if tracing is not None:
            tracing.shutdown()
    return 0


def _describe(target: str) -> int:
    """Prints ``Plugin.facts`` of the app as one JSON line (for ``sidemesh validate``)."""
    try:
        app = load_app(target, os.getcwd())
    except LoadError as exc:
        print(f"cannot load the plugin app: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(json.dumps(app.facts()))
    return 0
