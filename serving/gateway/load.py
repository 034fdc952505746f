"""Load shedding: which requests the gateway admits, decided here and nowhere else.

    with shedder.request():          # every user request; Overloaded (503) past max_concurrency
        ...
        slot = shedder.try_teacher() # a fallback; None past teacher_max_concurrency
        with slot: ...               # held until the teacher's answer (or stream) is done

Nothing waits in a queue: past a budget the answer is an immediate 503 with Retry-After, so an
outage of the students cannot pile the whole traffic onto the teacher and take it down too, and
admitted requests keep their latency. A low-confidence answer the teacher has no room for is
served as it is (the student's answer beats an error); a failed student's request is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from stillhouse.common.config import FallbackSettings
from stillhouse.serving.gateway.errors import Overloaded
from stillhouse.serving.gateway.metrics import GatewayMetrics


@dataclass
class Budget:
    """At most `limit` at once (0: no limit). Pure counting; one event loop owns it."""

    name: str
    limit: int
    in_use: int = 0

    def try_take(self) -> bool:
        if self.limit and self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1


class Slot:
    """A taken unit of a budget, given back once (`with`, or `close()`)."""

    __slots__ = ("_budget",)

    def __init__(self, budget: Budget) -> None:
        self._budget: Budget | None = budget

    def close(self) -> None:
        if self._budget is not None:
            self._budget.give_back()
            self._budget = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Shedder:
    def __init__(self, settings: FallbackSettings, metrics: GatewayMetrics) -> None:
        self.retry_after_s = settings.retry_after_s
        self.metrics = metrics
        self.gateway = Budget("gateway", settings.max_concurrency)
        self.teacher = Budget("teacher", settings.teacher_max_concurrency)
        self.export_gauges()

    def export_gauges(self) -> None:
        """The budgets' use, read before each scrape (not set on every request)."""
        for budget in (self.gateway, self.teacher):
            self.metrics.in_flight.labels(budget.name).set(budget.in_use)

    def _take(self, budget: Budget) -> Slot | None:
        if not budget.try_take():
            self.metrics.shed.labels(budget.name).inc()
            return None
        return Slot(budget)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Admit one user request for the block, or raise `Overloaded`."""
        slot = self._take(self.gateway)
        if slot is None:
            raise self.refusal("the gateway is at its concurrency limit")
        with slot:
            yield

    def try_teacher(self) -> Slot | None:
        """A slot on the teacher for one fallback, or None when its budget is spent."""
        return self._take(self.teacher)

    def refusal(self, why: str) -> Overloaded:
        return Overloaded(f"{why}; retry after {self.retry_after_s}s", self.retry_after_s)
