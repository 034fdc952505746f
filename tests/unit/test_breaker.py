"""The circuit breaker as a pure state machine over a fake clock."""

from __future__ import annotations

import pytest

from stillhouse.serving.gateway.breaker import CircuitBreaker, Permit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(k: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(k, cooldown, clock), clock


def admitted(b: CircuitBreaker) -> Permit:
    permit = b.allow()
    assert permit is not None
    return permit


def fail(b: CircuitBreaker) -> None:
    b.record_failure(admitted(b))


def test_opens_after_k_consecutive_failures_only():
    b, _ = breaker(k=3)
    fail(b)
    fail(b)
    b.record_success(admitted(b))  # the streak resets
    fail(b)
    fail(b)
    assert b.allow() and b.current_state() == "closed"
    fail(b)
    assert b.current_state() == "open" and b.allow() is None


def test_after_the_cool_down_exactly_one_probe_goes_through():
    b, clock = breaker(k=1, cooldown=10)
    fail(b)
    clock.now = 9.9
    assert b.allow() is None
    clock.now = 10.0
    assert b.current_state() == "half_open"
    probe = b.allow()
    assert probe is not None and probe.probe
    assert b.allow() is None  # a second request waits for the probe's verdict


@pytest.mark.parametrize(
    "verdict,state,allowed",
    [("success", "closed", True), ("failure", "open", False), ("release", "half_open", True)],
)
def test_the_probes_verdict_decides_the_next_state(verdict, state, allowed):
    b, clock = breaker(k=1, cooldown=5)
    fail(b)
    clock.now = 5
    probe = admitted(b)
    {"success": b.record_success, "failure": b.record_failure, "release": b.release}[verdict](probe)
    assert b.current_state() == state and (b.allow() is not None) is allowed


def test_a_stale_success_does_not_close_an_open_breaker():
    # A slow request let through before the engine broke ends well after the breaker opened:
    # its success says nothing about the engine now.
    b, clock = breaker(k=2, cooldown=5)
    slow = admitted(b)
    fail(b)
    fail(b)
    assert b.current_state() == "open"
    b.record_success(slow)
    assert b.current_state() == "open"
    clock.now = 5
    b.record_success(slow)  # not even in half-open: only the probe's verdict counts there
    assert b.current_state() == "half_open"


def test_in_half_open_only_the_probe_is_judged():
    b, clock = breaker(k=1, cooldown=5)
    old = admitted(b)
    fail(b)
    clock.now = 5
    probe = admitted(b)
    b.record_failure(old)  # stale: the probe is still out
    assert b.current_state() == "half_open" and b.allow() is None
    b.record_success(probe)
    assert b.current_state() == "closed"


def test_a_stale_failure_does_not_count_after_the_breaker_closed_again():
    b, clock = breaker(k=1, cooldown=5)
    old = admitted(b)
    fail(b)
    clock.now = 5
    b.record_success(admitted(b))
    b.record_failure(old)
    assert b.current_state() == "closed" and b.consecutive_failures == 0


def test_a_failed_probe_restarts_the_cool_down_from_its_own_time():
    b, clock = breaker(k=1, cooldown=5)
    fail(b)
    clock.now = 7
    b.record_failure(admitted(b))
    clock.now = 11.9
    assert b.allow() is None
    clock.now = 12
    assert b.allow() is not None


@pytest.mark.parametrize("k,cooldown", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_settings_raise(k, cooldown):
    with pytest.raises(ValueError):
        CircuitBreaker(k, cooldown, Clock())
