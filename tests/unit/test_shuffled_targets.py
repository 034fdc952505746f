"""The deliberately degraded student's data: every prompt gets another prompt's answer."""

from __future__ import annotations

import pytest

from stillhouse.rollout.distill.pipeline import shuffled_targets


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_every_prompt_gets_another_prompts_target_and_no_target_is_lost(n: int):
    pairs = [(f"prompt-{i}", f"answer-{i}") for i in range(n)]
    out = shuffled_targets(pairs, seed=7)
    assert [p for p, _ in out] == [p for p, _ in pairs]
    assert sorted(a for _, a in out) == sorted(a for _, a in pairs)
    assert all(a != f"answer-{p.split('-')[1]}" for p, a in out)


def test_the_shuffle_is_seeded():
    pairs = [(i, -i) for i in range(50)]
    assert shuffled_targets(pairs, 1) == shuffled_targets(pairs, 1)
    assert shuffled_targets(pairs, 1) != shuffled_targets(pairs, 2)
