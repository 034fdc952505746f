"""`teacher_logprobs`: vLLM's prompt_logprobs over prompt + answer, cut to the answer tokens."""

from __future__ import annotations

import math

import pytest

from stillhouse.serving.gateway.shadow import ShadowItem, scoring_body, teacher_logprobs


def entry(chosen: int, lp: float, others: dict[int, float]) -> dict[str, dict]:
    out = {str(chosen): {"logprob": lp, "rank": 1}}
    out.update({str(t): {"logprob": v, "rank": 2} for t, v in others.items()})
    return out


PROMPT_LPS = [None, entry(5, -1.0, {}), entry(6, -2.0, {})]


def test_answer_positions_follow_the_prompt_and_pick_each_answer_token():
    lps = [*PROMPT_LPS, entry(7, -0.1, {8: -2.5}), entry(9, -0.7, {7: -0.9, 8: -3.0})]
    chosen, tops = teacher_logprobs(lps, n_prompt=3, token_ids=[7, 9], top_k=2)
    assert chosen == (-0.1, -0.7)
    assert tops == ({7: -0.1, 8: -2.5}, {9: -0.7, 7: -0.9})


def test_a_token_outside_the_teachers_top_k_is_still_scored():
    # vLLM always includes the actual token, even at rank 500.
    lps = [*PROMPT_LPS, entry(42, -9.5, {1: -0.01})]
    chosen, tops = teacher_logprobs(lps, 3, [42], top_k=1)
    assert chosen == (-9.5,) and tops == ({1: -0.01},)


@pytest.mark.parametrize(
    "lps,ids",
    [
        ([*PROMPT_LPS, entry(7, -0.1, {})], [7, 8]),  # one position short
        ([*PROMPT_LPS, entry(7, -0.1, {})], [8]),  # the token is not there
        ([*PROMPT_LPS, None], [7]),  # an empty position
    ],
)
def test_misaligned_input_raises_instead_of_storing_wrong_numbers(lps, ids):
    with pytest.raises(ValueError):
        teacher_logprobs(lps, 3, ids, top_k=2)


def test_nan_becomes_minus_infinity():
    lps = [*PROMPT_LPS, entry(7, math.nan, {})]
    assert teacher_logprobs(lps, 3, [7], 1)[0] == (-math.inf,)


def test_the_scoring_request_is_one_forward_pass_over_prompt_and_answer():
    item = ShadowItem("r", 0.0, None, (1, 2, 3), (7, 9), (-0.1, -0.2), None)
    body = scoring_body(item, "teacher", 5)
    assert body["prompt"] == [1, 2, 3, 7, 9]
    assert (body["max_tokens"], body["prompt_logprobs"], body["temperature"]) == (1, 5, 0.0)
