"""Rate and concurrency limits per principal: what a caller over its limit is told."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from google.rpc import error_details_pb2

from clients import ResourceExhaustedError
from orchestrator._auth_config import AuthConfig, PolicyConfig
from orchestrator._authz import Policy
from orchestrator._limits import PrincipalLimits, RateLimited
from orchestrator._principals import Principal

SOURCE = "/etc/sidemesh/sidemesh.yaml"
CI = Principal("token:ci", "token")
OPS = Principal("token:ops", "token")
BOT = Principal("plugin:bot", "plugin")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(clock: Clock, **default: Any) -> PrincipalLimits:
    policy = Policy(
        AuthConfig(),
        PolicyConfig.model_validate(
            {
                "rules": [
                    {"principals": ["token:ci"], "allow": {"tools": ["*"]},
                     "limits": {"calls_per_second": 2, "burst": 3}},
                    {"principals": ["token:ops"], "limits": {"max_in_flight": 2}},
                ],
                "default_limits": default or None,
            }
        ),
    )  # fmt: skip
    return PrincipalLimits(policy.limits_for, source=SOURCE, clock=clock)


def over(limits: PrincipalLimits, principal: Principal) -> RateLimited:
    with pytest.raises(ResourceExhaustedError) as caught:
        limits.enter(principal)
    assert isinstance(caught.value, RateLimited)
    return caught.value


def test_the_bucket_allows_a_burst_then_the_rate_with_retry_info() -> None:
    clock = Clock()
    lim = limits(clock)
    for _ in range(3):  # the burst
        lim.enter(CI)
        lim.leave(CI)
    err = over(lim, CI)
    assert err.reason == "RATE_LIMITED"
    assert err.retry_delay == pytest.approx(0.5)  # one token at 2/s
    assert err.message == (
        "principal 'token:ci' is over its rate limit of 2 calls/s (burst 3, "
        "policy.rules[0].limits); retry in 0.500 s (operators: raise policy.rules[0].limits "
        f"in {SOURCE})"
    )
    details = err.to_status_proto().details
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert details[0].Unpack(info) and info.metadata["principal"] == "token:ci"
    assert details[1].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 500_000_000
    clock.now += 0.2  # 0.4 of a token: still refused, sooner
    assert over(lim, CI).retry_delay == pytest.approx(0.3)
    clock.now += 0.3
    lim.enter(CI)  # refilled to one token
    clock.now += 60  # a long pause refills up to the burst, not beyond
    for _ in range(3):
        lim.enter(CI)
    over(lim, CI)
    assert lim.counts()["token:ci"] == (7, 3, 0)
    assert lim.in_flight(CI) == 4


def test_the_in_flight_cap_refuses_until_a_call_ends() -> None:
    lim = limits(Clock())
    lim.enter(OPS)
    lim.enter(OPS)
    err = over(lim, OPS)
    assert err.reason == "CONCURRENCY_LIMITED"
    assert err.retry_delay == pytest.approx(0.1)
    assert err.message.startswith(
        "principal 'token:ops' already has 2 calls in flight, its limit "
        "(policy.rules[1].limits.max_in_flight); retry when one ends"
    )
    lim.leave(OPS)
    lim.enter(OPS)
    assert lim.counts()["token:ops"] == (3, 0, 1)


def test_principals_have_their_own_buckets_and_unlimited_ones_are_counted() -> None:
    clock = Clock()
    lim = limits(clock, max_in_flight=1)
    for _ in range(3):
        lim.enter(CI)
    over(lim, CI)
    other = Principal("token:other", "token")
    lim.enter(other)  # default_limits: one in flight
    assert over(lim, other).reason == "CONCURRENCY_LIMITED"
    for _ in range(100):  # plugins get no default limits
        lim.enter(BOT)
    assert lim.counts()["plugin:bot"] == (100, 0, 0)


def test_limits_hold_across_threads() -> None:
    lim = limits(Clock())
    admitted: list[int] = []
    refused: list[int] = []

    def worker() -> None:
        for _ in range(200):
            try:
                lim.enter(OPS)
            except RateLimited:
                refused.append(1)
                continue
            admitted.append(1)
            lim.leave(OPS)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) + len(refused) == 800
    assert lim.in_flight(OPS) == 0
    assert lim.counts()["token:ops"] == (len(admitted), 0, len(refused))
