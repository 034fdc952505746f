"""A circuit breaker per engine: stop sending requests to an engine that keeps failing, and
probe it again after a cool-down. A pure state machine over an injected clock.

    closed ──K consecutive failures──▶ open ──cool-down elapsed──▶ half-open (one probe)
      ▲                                  ▲                              │
      └──────────── probe succeeds ──────┼──────── probe fails ─────────┘

While open, `allow()` is False and the gateway goes straight to the fallback, costing the
client nothing. In half-open exactly one request (the probe) is let through at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class CircuitBreaker:
    failure_threshold: int
    cooldown_s: float
    clock: Callable[[], float]
    state: State = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = field(default=False)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.cooldown_s <= 0:
            raise ValueError("cooldown_s must be > 0")

    def current_state(self) -> State:
        """The state as of now (an open breaker whose cool-down passed reads half-open)."""
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
            self.probe_in_flight = False
        return self.state

    def allow(self) -> bool:
        """May a request go to this engine now? In half-open, True once (the probe)."""
        state = self.current_state()
        if state == "closed":
            return True
        if state == "half_open" and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self.probe_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open" or self.consecutive_failures >= self.failure_threshold:
            self.state = "open"
            self.opened_at = self.clock()
            self.probe_in_flight = False

    def release_probe(self) -> None:
        """A probe ended without a verdict on the engine (the client's own 4xx, a cancel)."""
        self.probe_in_flight = False
