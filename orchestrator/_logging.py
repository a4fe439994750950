"""Log format of the orchestrator: one line per record, tagged with who said it."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace

# Every C0 control but newline and tab, DEL, and the C1 controls: shown, never obeyed.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}


class _Formatter(logging.Formatter):
    """``12:00:00.123 INFO  tools-demo[0]: message``; sidecar lines carry their plugin tag.

    Inside a call, the orchestrator's own lines end with ``trace_id=… span_id=…``.
    Messages often carry text a plugin chose (its output, its error details):
    control characters are escaped, and every line after a record's first is
    indented, so no text can pass for a record of its own or drive the terminal.
    """

    def format(self, record: logging.LogRecord) -> str:
        record.trace = ""
        if not record.name.startswith("plugin."):  # sidecars add their own ids
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace = f" trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}"
        name = record.name
        if name.startswith("plugin."):
            record.tag = name[len("plugin.") :]
        elif name.startswith("sidemesh."):
            record.tag = name[len("sidemesh.") :]
        else:
            record.tag = name
        text = super().format(record)
        return text.translate(_CONTROLS).replace("\n", "\n    ")


def configure_logging(level: str) -> None:
    """Sends every log record to stderr in the orchestrator's format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-5s %(tag)s: %(message)s%(trace)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Sidecar output is logged at the sidecar's own level; keep it at INFO and up by default.
    logging.getLogger("plugin").setLevel(min(logging.INFO, logging.getLevelName(level)))
