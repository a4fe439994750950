"""The sidecar's logging: one line per record on stderr, ``LEVEL logger: message``.

The orchestrator reads stderr and adds the time and the ``plugin[replica]``
tag to each line, so the sidecar writes neither.
"""

from __future__ import annotations

import logging
import sys

LOG_LEVEL_ENV = "SIDEMESH_LOG_LEVEL"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _OneLine(logging.Formatter):
    """Keeps each record on one line: tracebacks and multi-line messages are joined with `` | ``.

    One record is then one line for the orchestrator, which tags and forwards lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def configure_logging(level_name: str | None) -> None:
    """Sends all logging to stderr at ``level_name`` (``INFO`` when unset or unknown)."""
    level = (level_name or "INFO").strip().upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in _LEVELS else "INFO")
    if level not in _LEVELS:
        logging.getLogger("sidecars").warning(
            "%s=%r is not one of %s; using INFO", LOG_LEVEL_ENV, level_name, ", ".join(_LEVELS)
        )
