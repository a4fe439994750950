"""Rate and concurrency limits per principal: a token bucket and a cap on calls in flight.

::

    limits = PrincipalLimits(policy.limits_for, source=str(config_path))
    limits.enter(principal)      # or RateLimited (RESOURCE_EXHAUSTED with RetryInfo)
    try:
        ...                      # the call
    finally:
        limits.leave(principal)  # only after an enter that returned

Each principal has its own bucket of ``burst`` calls refilled at
``calls_per_second``, and its own count of calls in flight against
``max_in_flight`` (the limits come from the policy: the first rule naming the
principal that sets ``limits``, else ``policy.default_limits``). A refused call
carries ``RetryInfo`` with the time until the bucket holds a token again.

:meth:`PrincipalLimits.counts` gives, per principal, the calls admitted and refused by
rate and by concurrency, for the metrics. ``enter`` and ``leave`` are O(1),
take one uncontended per-principal lock, and are safe from any thread (the data
plane's and asyncio's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from orchestrator._auth_config import RateLimits
from orchestrator._principals import Principal
from sidemesh.core import ResourceExhaustedError

#: ``RetryInfo`` of a call refused for concurrency: there is no way to know when one ends.
CONCURRENCY_RETRY_DELAY = 0.1


class RateLimited(ResourceExhaustedError):
    """``RESOURCE_EXHAUSTED``: ``principal`` is over its rate (``RATE_LIMITED``) or its calls in
    flight (``CONCURRENCY_LIMITED``); ``retry_delay`` says when to retry."""

    def __init__(self, message: str, *, reason: str, principal: Principal, retry_delay: float):
        super().__init__(
            message, reason=reason, metadata={"principal": principal.name}, retry_delay=retry_delay
        )
        self.principal = principal


class _State:
    """One principal's bucket, calls in flight and counters."""

    __slots__ = ("admitted", "burst", "busy", "cap", "in_flight", "limited", "lock", "rate",
                 "stamp", "tokens", "where")  # fmt: skip

    def __init__(self, limits: RateLimits | None, where: str, now: float) -> None:
        self.rate = limits.calls_per_second if limits else None
        self.burst = float(limits.bucket_size) if limits and self.rate else 0.0
        self.cap = limits.max_in_flight if limits else None
        self.where = where
        self.tokens = self.burst
        self.stamp = now
        self.in_flight = 0
        self.admitted = 0
        self.limited = 0  # refused by rate
        self.busy = 0  # refused by concurrency
        self.lock = threading.Lock()


class PrincipalLimits:
    """The limits of every principal; ``limits_for`` is :meth:`Policy.limits_for`."""

    def __init__(
        self,
        limits_for: Callable[[Principal], tuple[RateLimits | None, str]],
        *,
        source: str = "sidemesh.yaml",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits_for = limits_for
        self._source = source
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def enter(self, principal: Principal) -> None:
        """Admits one call of ``principal``, or raises :class:`RateLimited`."""
        state = self._states.get(principal.name) or self._state(principal)
        delay = CONCURRENCY_RETRY_DELAY
        with state.lock:
            if state.cap is not None and state.in_flight >= state.cap:
                state.busy += 1
                refused = "CONCURRENCY_LIMITED"
            elif state.rate is not None:
                now = self._clock()
                tokens = min(state.burst, state.tokens + (now - state.stamp) * state.rate)
                state.stamp = now
                if tokens >= 1.0:
                    state.tokens = tokens - 1.0
                    state.in_flight += 1
                    state.admitted += 1
                    return
                state.tokens = tokens
                state.limited += 1
                refused = "RATE_LIMITED"
                delay = (1.0 - tokens) / state.rate
            else:
                state.in_flight += 1
                state.admitted += 1
                return
        raise self._refusal(principal, state, refused, delay)

    def leave(self, principal: Principal) -> None:
        """Ends one admitted call of ``principal``."""
        state = self._states.get(principal.name)
        if state is not None:
            with state.lock:
                state.in_flight -= 1

    def in_flight(self, principal: Principal) -> int:
        """Calls of ``principal`` admitted and not yet left."""
        state = self._states.get(principal.name)
        return state.in_flight if state is not None else 0

    def counts(self) -> dict[str, tuple[int, int, int]]:
        """Principal -> (calls admitted, refused by rate, refused by concurrency), since start."""
        return {name: (s.admitted, s.limited, s.busy) for name, s in list(self._states.items())}

    def reset(self) -> None:
        """Forgets every principal's state (after the policy changed: limits are re-read)."""
        with self._lock:
            self._states = {}

    def _state(self, principal: Principal) -> _State:
        with self._lock:
            state = self._states.get(principal.name)
            if state is None:
                limits, where = self._limits_for(principal)
                state = self._states[principal.name] = _State(limits, where, self._clock())
            return state

    def _refusal(
        self, principal: Principal, state: _State, reason: str, delay: float
    ) -> RateLimited:
        fix = f"operators: raise {state.where} in {self._source}"
        if reason == "CONCURRENCY_LIMITED":
            return RateLimited(
                f"principal {principal.name!r} already has {state.cap} calls in flight, its "
                f"limit ({state.where}.max_in_flight); retry when one ends ({fix})",
                reason=reason,
                principal=principal,
                retry_delay=delay,
            )
        return RateLimited(
            f"principal {principal.name!r} is over its rate limit of {state.rate:g} calls/s "
            f"(burst {state.burst:g}, {state.where}); retry in {delay:.3f} s ({fix})",
            reason=reason,
            principal=principal,
            retry_delay=delay,
        )
