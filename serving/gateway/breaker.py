"""A circuit breaker per engine: stop sending requests to an engine that keeps failing, and
probe it again after a cool-down. A pure state machine over an injected clock.

    closed ──K consecutive failures──▶ open ──cool-down elapsed──▶ half-open (one probe)
      ▲                                  ▲                              │
      └──────────── probe succeeds ──────┼──────── probe fails ─────────┘

    permit = breaker.allow()          # None: open (the gateway goes straight to fallback)
    ...the whole attempt, a stream to its end...
    breaker.record_success(permit) | record_failure(permit) | release(permit)

A verdict is about one admitted attempt, judged on its whole outcome (a stream's too, not its
headers). Each time the breaker opens it starts a new epoch; a verdict from an attempt admitted
in an earlier epoch is stale and ignored, so a slow request that started before the engine
broke cannot close the breaker, and in half-open only the probe's verdict counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True, slots=True)
class Permit:
    """One attempt let through: the epoch it was let through in, and whether it is the probe."""

    epoch: int
    probe: bool = False


@dataclass
class CircuitBreaker:
    failure_threshold: int
    cooldown_s: float
    clock: Callable[[], float]
    state: State = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    epoch: int = 0  # +1 each time the breaker opens
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

    def allow(self) -> Permit | None:
        """May a request go to this engine now? In half-open, once (the probe)."""
        state = self.current_state()
        if state == "closed":
            return Permit(self.epoch)
        if state == "half_open" and not self.probe_in_flight:
            self.probe_in_flight = True
            return Permit(self.epoch, probe=True)
        return None

    def _counts(self, permit: Permit) -> bool:
        """Whether a verdict on `permit` may change the state (not stale, and in half-open
        only the probe's)."""
        if permit.epoch != self.epoch:
            return False
        return permit.probe or self.current_state() == "closed"

    def record_success(self, permit: Permit) -> None:
        if not self._counts(permit):
            return
        self.state = "closed"
        self.consecutive_failures = 0
        self.probe_in_flight = False

    def record_failure(self, permit: Permit) -> None:
        if not self._counts(permit):
            return
        self.consecutive_failures += 1
        if permit.probe or self.consecutive_failures >= self.failure_threshold:
            self.state = "open"
            self.opened_at = self.clock()
            self.epoch += 1
            self.probe_in_flight = False

    def reset(self) -> None:
        """The engine was restarted and is ready: closed, with a new epoch (every verdict on
        an attempt to the old process is stale)."""
        self.state = "closed"
        self.consecutive_failures = 0
        self.epoch += 1
        self.probe_in_flight = False

    def release(self, permit: Permit) -> None:
        """An attempt ended without a verdict on the engine (the client's own 4xx, a cancel):
        a probe's slot is free again."""
        if permit.probe and permit.epoch == self.epoch:
            self.probe_in_flight = False
