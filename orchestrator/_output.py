"""A plugin's output, made safe to log: escaped, cut to length, and rate-limited.

Everything a sidecar writes to stdout and stderr is hostile text. Before it
reaches the orchestrator's log (an operator's terminal, a log shipper):

- control characters (ESC sequences that retitle or clear a terminal, ``\\r``
  that rewrites a line so it looks like the orchestrator's own, backspaces,
  C1 controls, Unicode bidi overrides) are shown escaped, never interpreted;
- a line longer than ``max_line_bytes`` is cut, and says how much was cut;
- lines past ``lines_per_second`` (after a ``burst``) are dropped and counted;
  the count is logged once a second while it grows, and kept per replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Unicode format characters that reorder or hide text (bidi controls, isolates).
_INVISIBLE = frozenset(
    "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c\ufeff"
)


@dataclass(frozen=True)
class OutputLimits:
    """How much of a replica's output the orchestrator logs."""

    lines_per_second: float = 200.0
    burst: int = 1000
    max_line_bytes: int = 4096


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_TABLE = {c: _escape(chr(c)) for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F)}
_TABLE.update({c: _escape(chr(c)) for c in range(0x80, 0xA0)})
_TABLE.update({ord(c): _escape(c) for c in _INVISIBLE})


def clean_line(raw: bytes, max_bytes: int) -> str:
    """One line of plugin output as printable text: decoded, escaped and cut to length."""
    cut = len(raw) - max_bytes
    if cut > 0:
        raw = raw[:max_bytes]
    text = raw.decode("utf-8", "replace").translate(_TABLE)
    return f"{text}… [{cut} more bytes cut]" if cut > 0 else text


class LineBudget:
    """A token bucket of lines: ``admit()`` is False past the rate, and counts the drop."""

    def __init__(self, limits: OutputLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = limits.lines_per_second
        self._burst = float(limits.burst)
        self._tokens = self._burst
        self._clock = clock
        self._last = clock()
        #: Lines dropped since the replica started.
        self.dropped = 0
        self._reported = 0
        self._reported_at = 0.0

    def admit(self) -> bool:
        """Takes one line's token; False (and counted) when there is none."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        return False

    def drop(self, lines: int) -> None:
        """Counts ``lines`` dropped without being looked at."""
        self.dropped += lines

    def report(self) -> int:
        """Lines dropped since the last report, at most once a second (0: nothing to say)."""
        now = self._clock()
        if self.dropped == self._reported or now - self._reported_at < 1.0:
            return 0
        new, self._reported, self._reported_at = self.dropped - self._reported, self.dropped, now
        return new
