"""Token-budget batches and the warmup + cosine schedule (rollout/distill/batching.py), shared
by the student's loop and the demo teacher's."""

import itertools
import random

import pytest

from stillhouse.rollout.distill.batching import LrSchedule, lr_at, token_budget_batches


def test_token_budget_batches_cover_every_example_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(300)]
    batches = token_budget_batches(lengths, batch_tokens=256, rng=random.Random(1))
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(300))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 256


def test_token_budget_batches_are_the_same_for_the_same_seed():
    lengths = [random.Random(2).randint(1, 90) for _ in range(100)]
    first = token_budget_batches(lengths, 300, random.Random(5))
    assert first == token_budget_batches(lengths, 300, random.Random(5))
    assert first != token_budget_batches(lengths, 300, random.Random(6))


def test_lr_warms_up_then_decays_to_the_floor():
    schedule = LrSchedule(learning_rate=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, schedule) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"learning_rate": 1.0, "warmup_ratio": 1.0},
        {"learning_rate": 1.0, "warmup_ratio": -0.1},
        {"learning_rate": 1.0, "min_lr_ratio": 1.5},
    ],
)
def test_lr_schedule_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError):
        LrSchedule(**kwargs)
