"""The circuit breaker as a pure state machine over a fake clock."""

from __future__ import annotations

import pytest

from stillhouse.serving.gateway.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(k: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(k, cooldown, clock), clock


def test_opens_after_k_consecutive_failures_only():
    b, _ = breaker(k=3)
    b.record_failure()
    b.record_failure()
    b.record_success()  # the streak resets
    b.record_failure()
    b.record_failure()
    assert b.allow() and b.current_state() == "closed"
    b.record_failure()
    assert b.current_state() == "open" and not b.allow()


def test_after_the_cool_down_exactly_one_probe_goes_through():
    b, clock = breaker(k=1, cooldown=10)
    b.record_failure()
    clock.now = 9.9
    assert not b.allow()
    clock.now = 10.0
    assert b.current_state() == "half_open"
    assert b.allow()
    assert not b.allow()  # a second request waits for the probe's verdict


@pytest.mark.parametrize(
    "verdict,state,allowed",
    [("success", "closed", True), ("failure", "open", False), ("release", "half_open", True)],
)
def test_the_probes_verdict_decides_the_next_state(verdict, state, allowed):
    b, clock = breaker(k=1, cooldown=5)
    b.record_failure()
    clock.now = 5
    assert b.allow()
    {"success": b.record_success, "failure": b.record_failure, "release": b.release_probe}[
        verdict
    ]()
    assert b.current_state() == state and b.allow() is allowed


def test_a_failed_probe_restarts_the_cool_down_from_its_own_time():
    b, clock = breaker(k=1, cooldown=5)
    b.record_failure()
    clock.now = 7
    assert b.allow()
    b.record_failure()
    clock.now = 11.9
    assert not b.allow()
    clock.now = 12
    assert b.allow()


@pytest.mark.parametrize("k,cooldown", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_settings_raise(k, cooldown):
    with pytest.raises(ValueError):
        CircuitBreaker(k, cooldown, Clock())
