"""Faults become retries, not errors: the retry budget, outlier ejection, and backoff.

The router asks three questions of a plugin's :class:`Resilience` when an
attempt fails: is it the replica's fault (:func:`failure_kind`), may the call
be retried (:meth:`Resilience.may_retry`), and should the replica leave
rotation (:meth:`Resilience.failed`). Ejection follows Envoy's outlier
detection: consecutive gateway failures eject a replica for
``base_ejection * 2**(n-1)`` (capped), never the last one taking calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from orchestrator._config import OutlierDetection, RetryPolicy

if TYPE_CHECKING:
    from orchestrator._replica import Replica

log = logging.getLogger("sidemesh.router")

#: An attempt that provably never reached a sidecar: always safe to retry.
NEVER_REACHED = "never_reached"
#: The replica failed mid-call (it died, its connection closed): safe only when idempotent.
TRANSPORT = "transport"
#: The attempt waited longer than the per-try timeout.
TIMEOUT = "timeout"
#: Not a call: the replica failed a health check.
HEALTH = "health"

# What gRPC core says when a call could not even be sent.
_NOT_SENT = ("failed to connect", "connection refused", "no such file", "connect failed")


def failure_kind(exc: grpc.aio.AioRpcError) -> str | None:
    """Whether a failed attempt was the replica's fault, and how; None for the plugin's own error.

    The plugin's own statuses (``INVALID_ARGUMENT``, ``INTERNAL`` from a
    connected sidecar, ...) pass through: they say nothing of the replica's
    health and are never retried.
    """
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    text = f"{exc.details()} {exc.debug_error_string()}".lower()
    return NEVER_REACHED if any(marker in text for marker in _NOT_SENT) else TRANSPORT


class RetryBudget:
    """Retries may add at most ``percent`` to the calls made, plus ``min_per_second``.

    A token bucket (Finagle's and Linkerd's retry budget): every call deposits
    ``percent / 100`` of a token, a retry spends one; a floor of
    ``min_per_second`` tokens accrues with time. The bucket holds at most ten
    seconds' worth, so a burst of failures cannot spend a long quiet past.
    """

    def __init__(
        self, percent: float, min_per_second: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ratio = percent / 100.0
        self._floor = min_per_second
        self._clock = clock
        self._tokens = min_per_second
        self._cap = max(10.0 * min_per_second, 10.0)
        self._last = clock()

    def deposit(self) -> None:
        """Called for every call (not every retry)."""
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def try_spend(self) -> bool:
        """Takes a token for one retry; False when the budget is spent."""
        now = self._clock()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self._floor)
        self._last = now
        if self._tokens < 1.0 - 1e-9:  # ten deposits of 0.1 are a token
            return False
        self._tokens -= 1.0
        return True


def backoff(policy: RetryPolicy, retry: int) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...): exponential, full jitter."""
    ceiling = min(policy.backoff_max, policy.backoff_initial * 2 ** (retry - 1))
    return random.uniform(0, ceiling)


class Resilience:
    """One plugin's retry budget and its replicas' outlier state."""

    def __init__(
        self,
        plugin: str,
        retries: RetryPolicy,
        outliers: OutlierDetection,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plugin = plugin
        self.retries = retries
        self.outliers = outliers
        self.budget = RetryBudget(retries.budget_percent, retries.budget_min_per_second, clock)
        #: Told of each ejection (replica, seconds, reason) and return to rotation.
        self.on_ejected: Callable[[Replica, float, str], None] | None = None
        self.on_restored: Callable[[Replica], None] | None = None
        self._clock = clock

    def may_retry(self, kind: str, idempotent: bool, attempt: int) -> bool:
        """Whether a call whose ``attempt``-th try failed (``kind``) may be tried again."""
        if attempt >= self.retries.max_attempts:
            return False
        if kind != NEVER_REACHED and not idempotent:
            return False
        return self.budget.try_spend()

    # -- outliers -------------------------------------------------------------

    def succeeded(self, replica: Replica) -> None:
        """An attempt on ``replica`` got its answer."""
        replica.consecutive_failures = 0

    def failed(self, replica: Replica, kind: str, ready: list[Replica]) -> None:
        """An attempt on ``replica`` failed by its fault; ejects it after too many in a row."""
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.outliers.consecutive_failures:
            self._maybe_eject(replica, kind, ready)

    def health_failed(self, replica: Replica, ready: list[Replica]) -> None:
        """A health check of ``replica`` failed: it leaves rotation at once, if others serve.

        The supervisor replaces it only after several failed checks; until
        then, calls go to the other replicas.
        """
        self._maybe_eject(replica, HEALTH, ready)

    def health_passed(self, replica: Replica) -> None:
        """A health check passed: a replica ejected for its health returns at once."""
        if replica.ejected_until and replica.ejection_kind == HEALTH:
            self._restore(replica, replica.generation)

    def _maybe_eject(self, replica: Replica, kind: str, ready: list[Replica]) -> None:
        now = self._clock()
        if replica.ejected(now) or replica not in ready:
            return
        serving = [r for r in ready if not r.ejected(now)]
        ejected = len(ready) - len(serving)
        allowed = max(1, len(ready) * self.outliers.max_ejected_percent // 100)
        if len(serving) <= 1 or ejected >= allowed:
            return  # never the last replica taking calls; never more than allowed
        self._eject(replica, kind)

    def _eject(self, replica: Replica, kind: str) -> None:
        now = self._clock()
        if now - replica.last_ejection_end > self.outliers.max_ejection:
            replica.ejections = 0  # it behaved for a good while: start over
        replica.ejections += 1
        seconds = min(
            self.outliers.max_ejection,
            self.outliers.base_ejection * 2 ** (replica.ejections - 1),
        )
        if kind == HEALTH:
            reason = "its health check failed"
        else:
            what = {TIMEOUT: "per-try timeouts", NEVER_REACHED: "connection failures"}.get(
                kind, "transport failures"
            )
            reason = f"{replica.consecutive_failures} {what} in a row"
        replica.eject(now + seconds, reason, kind)
        log.warning("%s: ejected for %.1fs: %s", replica.tag, seconds, reason)
        if self.on_ejected is not None:
            self.on_ejected(replica, seconds, reason)
        asyncio.get_running_loop().call_later(seconds, self._restore, replica, replica.generation)

    def _restore(self, replica: Replica, generation: int) -> None:
        if replica.generation != generation or not replica.ejected_until:
            return  # restarted since, or restored already
        replica.restore(self._clock())
        replica.consecutive_failures = 0
        log.info("%s: back in rotation after its ejection", replica.tag)
        if self.on_restored is not None:
            self.on_restored(replica)
