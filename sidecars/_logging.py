"""The sidecar's logging: one line per record on stderr, ``LEVEL logger: message``.

The orchestrator reads stderr and adds the time and the ``plugin[replica]``
tag to each line, so the sidecar writes neither. A line logged inside a span
(while a call is handled, say) ends with `` trace_id=<32 hex> span_id=<16 hex>``,
so it can be found from the trace and the trace from it.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from opentelemetry import trace

from sidemesh.core import SidecarEnv

LOG_LEVEL_ENV = SidecarEnv.LOG_LEVEL
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class TraceContextFilter(logging.Filter):
    """Sets ``record.trace_context``: the current span's ids, or ``""`` outside a valid span."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span().get_span_context()
        record.trace_context = (
            f" trace_id={span.trace_id:032x} span_id={span.span_id:016x}" if span.is_valid else ""
        )
        return True


class _OneLine(logging.Formatter):
    """Keeps each record on one line: tracebacks and multi-line messages are joined with `` | ``.

    One record is then one line for the orchestrator, which tags and forwards
    lines. The trace context goes last, after any traceback.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " | ")
        return line + getattr(record, "trace_context", "")


def log_handler(stream: TextIO | None = None) -> logging.Handler:
    """A handler writing the sidecar's lines to ``stream`` (stderr by default)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_OneLine(_FORMAT))
    handler.addFilter(TraceContextFilter())
    return handler


def configure_logging(level_name: str | None) -> None:
    """Sends all logging to stderr at ``level_name`` (``INFO`` when unset or unknown)."""
    level = (level_name or "INFO").strip().upper()
    root = logging.getLogger()
    root.handlers[:] = [log_handler()]
    root.setLevel(level if level in _LEVELS else "INFO")
    if level not in _LEVELS:
        logging.getLogger("sidecars").warning(
            "%s=%r is not one of %s; using INFO", LOG_LEVEL_ENV, level_name, ", ".join(_LEVELS)
        )
