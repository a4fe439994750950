"""The retry budget, backoff and outlier ejection, on their own (an injected clock)."""

from __future__ import annotations

import grpc
import pytest

from orchestrator._config import OutlierDetection, RetryPolicy
from orchestrator._replica import Replica
from orchestrator._resilience import (
    NEVER_REACHED,
    TIMEOUT,
    TRANSPORT,
    Resilience,
    RetryBudget,
    backoff,
    failure_kind,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_allows_a_share_of_calls_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(percent=20, min_per_second=0, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # 20% of 10 calls
    floor = RetryBudget(percent=0, min_per_second=2, clock=clock)
    assert [floor.try_spend() for _ in range(3)] == [True, True, False]
    clock.now += 1.0  # two more per second
    assert [floor.try_spend() for _ in range(3)] == [True, True, False]


def test_backoff_is_jittered_below_a_doubling_ceiling() -> None:
    policy = RetryPolicy(backoff_initial=0.1, backoff_max=0.3)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (9, 0.3)):
        delays = [backoff(policy, retry) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jittered over the range, not fixed


def _replicas(n: int) -> list[Replica]:
    return [Replica("p", i, 1 << 20) for i in range(n)]


def test_only_safe_calls_are_retried_within_attempts() -> None:
    r = Resilience("p", RetryPolicy(max_attempts=2), OutlierDetection())
    assert r.may_retry(NEVER_REACHED, idempotent=False, attempt=1)  # never reached: safe
    assert not r.may_retry(TRANSPORT, idempotent=False, attempt=1)  # it may have run
    assert r.may_retry(TRANSPORT, idempotent=True, attempt=1)
    assert not r.may_retry(TRANSPORT, idempotent=True, attempt=2)  # out of attempts


async def test_consecutive_failures_eject_for_a_doubling_time_never_the_last() -> None:
    clock = Clock()
    outliers = OutlierDetection(consecutive_failures=2, base_ejection=1, max_ejection=3,
                                max_ejected_percent=50)  # fmt: skip
    r = Resilience("p", RetryPolicy(), outliers, clock=clock)
    seen: list[tuple[int, float, str]] = []
    r.on_ejected = lambda replica, seconds, why: seen.append((replica.index, seconds, why))
    a, b = ready = _replicas(2)
    r.failed(a, TIMEOUT, ready)
    assert not a.ejected(clock.now)  # one failure is not a pattern
    r.failed(a, TIMEOUT, ready)
    assert a.ejected(clock.now) and seen == [(0, 1.0, "2 per-try timeouts in a row")]
    r.failed(b, TRANSPORT, ready)
    r.failed(b, TRANSPORT, ready)
    assert not b.ejected(clock.now)  # the last one taking calls stays
    r.succeeded(a)
    clock.now += 1.5
    a.restore(clock.now)
    r.failed(a, TRANSPORT, ready)
    r.failed(a, TRANSPORT, ready)
    assert seen[-1][1] == 2.0  # the second ejection lasts twice as long
    clock.now += 10
    a.restore(clock.now)
    clock.now += 10  # behaved longer than max_ejection: the count starts over
    r.failed(a, TRANSPORT, ready)
    r.failed(a, TRANSPORT, ready)
    assert seen[-1][1] == 1.0


async def test_a_failed_health_check_ejects_at_once_and_a_passed_one_restores() -> None:
    r = Resilience("p", RetryPolicy(), OutlierDetection(max_ejected_percent=34))
    restored: list[int] = []
    r.on_restored = lambda replica: restored.append(replica.index)
    ready = _replicas(3)
    r.health_failed(ready[0], ready)
    r.health_failed(ready[1], ready)  # 34% of 3: only one at a time
    assert [bool(x.ejected_until) for x in ready] == [True, False, False]
    assert ready[0].ejection_reason == "its health check failed"
    r.health_passed(ready[0])
    assert not ready[0].ejected_until and restored == [0]


class _Error(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, details)


@pytest.mark.parametrize(
    ("code", "details", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", NEVER_REACHED),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", TRANSPORT),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad", None),
        (grpc.StatusCode.INTERNAL, "the plugin raised", None),
    ],
)
def test_failures_are_the_replicas_fault_only_when_the_transport_says_so(
    code: grpc.StatusCode, details: str, kind: str | None
) -> None:
    assert failure_kind(_Error(code, details)) == kind
