"""What the traffic cost per A/B arm, and what it would have cost had the teacher answered it
all. Prices per model role, per 1k tokens or per GPU-hour (with a measured throughput).
Fallbacks pay twice (the student's tokens, then the teacher's); a missing token count is never
taken as zero: the request is counted as unknown and left out of both sums.

Pure functions over plain rows. The pricing model in full: docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

TEACHER = "teacher"
_FAILED = "none"


@dataclass(frozen=True, slots=True)
class Price:
    """One model's price: either `prompt_per_1k` and `completion_per_1k` (currency per 1,000
    tokens), or `gpu_hour` (currency per GPU-hour) and `tokens_per_s_per_gpu` — exactly one mode."""

    prompt_per_1k: float | None = None
    completion_per_1k: float | None = None
    gpu_hour: float | None = None
    tokens_per_s_per_gpu: float | None = None

    def __post_init__(self) -> None:
        per_token = (self.prompt_per_1k, self.completion_per_1k)
        per_gpu = (self.gpu_hour, self.tokens_per_s_per_gpu)
        token_mode = any(v is not None for v in per_token)
        gpu_mode = any(v is not None for v in per_gpu)
        if token_mode == gpu_mode:
            raise ValueError(
                "set exactly one pricing mode: prompt_per_1k and completion_per_1k, "
                "or gpu_hour and tokens_per_s_per_gpu"
            )
        if token_mode and None in per_token:
            raise ValueError("per-1k pricing needs both prompt_per_1k and completion_per_1k")
        if gpu_mode and None in per_gpu:
            raise ValueError("GPU-hour pricing needs both gpu_hour and tokens_per_s_per_gpu")
        for name in ("prompt_per_1k", "completion_per_1k", "gpu_hour"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        rate = self.tokens_per_s_per_gpu
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"tokens_per_s_per_gpu must be positive, got {rate!r}")


def request_cost(prompt_tokens: int, completion_tokens: int, price: Price) -> float:
    """The cost of one model call. Token counts must be known non-negative integers."""
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if value is None or isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if price.gpu_hour is not None and price.tokens_per_s_per_gpu is not None:
        gpu_seconds = (prompt_tokens + completion_tokens) / price.tokens_per_s_per_gpu
        return gpu_seconds / 3600.0 * price.gpu_hour
    assert price.prompt_per_1k is not None and price.completion_per_1k is not None
    return (
        prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
    ) / 1000


class CostRow(Protocol):
    """What `arm_costs` reads from a request; `student_completion_tokens` is optional (read with
    getattr) and matters only for fallbacks (`served_by == "teacher"`)."""

    @property
    def arm(self) -> str: ...
    @property
    def served_by(self) -> str: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Request:
    """A plain cost row. The prompt count is taken to hold for the student and the teacher alike
    (students are distilled with the teacher's tokenizer)."""

    arm: str
    served_by: str  # "champion" | "challenger" | "teacher" (fallback) | "none" (failed)
    prompt_tokens: int | None
    completion_tokens: int | None
    student_completion_tokens: int | None = None  # spent by the student before a fallback


@dataclass(frozen=True, slots=True)
class ArmCost:
    """One arm's cost over its requests with known token counts.

    `n_requests` = `n_known` + `n_unknown` + `n_failed`. Failed requests (served_by "none") carry
    no answer and are counted apart. Per-request and fraction fields are NaN when undefined.
    """

    arm: str
    n_requests: int
    n_known: int
    n_unknown: int
    n_failed: int
    n_fallback: int
    total: float
    per_request: float
    teacher_only_total: float
    teacher_only_per_request: float
    savings: float
    savings_fraction: float


@dataclass(frozen=True, slots=True)
class CostSummary:
    """Per-arm costs and the same sums over all arms (`overall.arm` is "all")."""

    arms: dict[str, ArmCost]
    overall: ArmCost


@dataclass
class _Tally:
    n_requests: int = 0
    n_known: int = 0
    n_unknown: int = 0
    n_failed: int = 0
    n_fallback: int = 0
    total: float = 0.0
    teacher_only: float = 0.0

    def add(self, other: _Tally) -> None:
        for name in ("n_requests", "n_known", "n_unknown", "n_failed", "n_fallback"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.total += other.total
        self.teacher_only += other.teacher_only

    def freeze(self, arm: str) -> ArmCost:
        n, teacher_only = self.n_known, self.teacher_only
        return ArmCost(
            arm=arm,
            n_requests=self.n_requests,
            n_known=n,
            n_unknown=self.n_unknown,
            n_failed=self.n_failed,
            n_fallback=self.n_fallback,
            total=self.total,
            per_request=self.total / n if n else math.nan,
            teacher_only_total=teacher_only,
            teacher_only_per_request=teacher_only / n if n else math.nan,
            savings=teacher_only - self.total,
            savings_fraction=(teacher_only - self.total) / teacher_only
            if teacher_only
            else math.nan,
        )


def _price(prices: Mapping[str, Price], model: str) -> Price:
    try:
        return prices[model]
    except KeyError:
        raise ValueError(f"no price configured for {model!r} (have {sorted(prices)})") from None


def arm_costs(requests: Iterable[CostRow], prices: Mapping[str, Price]) -> CostSummary:
    """Cost per arm, the teacher-only counterfactual and the savings.

    A student-served request costs one call at its model's price. A fallback costs the student's
    call (prompt + `student_completion_tokens`, at the arm's price) plus the teacher's call. The
    teacher-only counterfactual prices every known request as one teacher call with the tokens
    that were served: the teacher's answer length is assumed equal to the student's.
    """
    if TEACHER not in prices:
        raise ValueError(f"no price configured for {TEACHER!r} (needed for the teacher-only cost)")
    tallies: dict[str, _Tally] = {}
    for row in requests:
        tally = tallies.setdefault(row.arm, _Tally())
        tally.n_requests += 1
        if row.served_by == _FAILED:
            tally.n_failed += 1
            continue
        fallback = row.served_by == TEACHER
        tally.n_fallback += int(fallback)
        student = getattr(row, "student_completion_tokens", None) if fallback else 0
        if row.prompt_tokens is None or row.completion_tokens is None or student is None:
            tally.n_unknown += 1
            continue
        served = request_cost(
            row.prompt_tokens, row.completion_tokens, _price(prices, row.served_by)
        )
        if fallback:
            served += request_cost(row.prompt_tokens, student, _price(prices, row.arm))
        tally.n_known += 1
        tally.total += served
        tally.teacher_only += request_cost(
            row.prompt_tokens, row.completion_tokens, prices[TEACHER]
        )
    overall = _Tally()
    for tally in tallies.values():
        overall.add(tally)
    return CostSummary(
        arms={arm: tally.freeze(arm) for arm, tally in sorted(tallies.items())},
        overall=overall.freeze("all"),
    )
