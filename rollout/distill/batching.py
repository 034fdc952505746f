"""How training steps are laid out: token-budget batches and the learning-rate schedule.

`token_budget_batches` groups example indices by length so that each batch's padded size stays
within a token budget (little padding), then shuffles the batches; `LrSchedule` is linear warmup
then cosine decay to a floor. Both are pure and seeded: the student's loop
(`rollout/distill/training.py`) and the demo teacher's (`demo/teacher.py`) use them alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


def token_budget_batches(
    lengths: Sequence[int], batch_tokens: int, rng: random.Random
) -> list[list[int]]:
    """Indices grouped so that (longest example x batch size) stays within `batch_tokens`.

    Examples are sorted by length (ties broken by one `rng.random()` draw each, in index
    order), packed greedily, and the batches shuffled with `rng`: the same lengths and the same
    seed give the same batches. An example longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the newest is the longest
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class LrSchedule:
    """Linear warmup over `warmup_ratio` of the steps (at least one), then cosine decay from
    `learning_rate` to `learning_rate * min_lr_ratio` at the last step."""

    learning_rate: float
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.05

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_at(step: int, total: int, schedule: LrSchedule) -> float:
    """The learning rate of step `step` (0-based) of `total`."""
    warmup = max(1, int(total * schedule.warmup_ratio))
    if step < warmup:
        return schedule.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = schedule.learning_rate * schedule.min_lr_ratio
    return floor + (schedule.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))
