import random

import pytest

from stillhouse.common.prompts import triage_answer
from stillhouse.demo.corpus import Ticket
from stillhouse.demo.evaluate import score_judge, score_triage
from stillhouse.demo.examples import make_judge_item

EASY = Ticket("t1", "my card was charged twice", "billing", "high", "test")
HARD = Ticket("t2", "the box never came", "shipping", "low", "test", ("rare_phrase",))


def test_triage_score_counts_fields_and_the_hard_slice_separately():
    outputs = [triage_answer("billing", "high", "x"), triage_answer("billing", "low", "x")]
    score = score_triage([EASY, HARD], outputs)
    assert score.n == 2 and score.hard_n == 1
    assert score.parsed == 1.0
    assert score.category_accuracy == 0.5
    assert score.priority_accuracy == 1.0
    assert score.hard_category_accuracy == 0.0
    assert score.hard_priority_accuracy == 1.0
    assert score.by_tag == {"rare_phrase": (0.0, 1.0)}


def test_unparseable_answers_count_as_wrong_not_as_missing():
    score = score_triage([EASY, HARD], ["garbage", triage_answer("shipping", "low", "x")])
    assert score.parsed == 0.5
    assert score.category_accuracy == 0.5


def test_judge_score_agreement_and_parse_rate():
    rng = random.Random(0)
    items = [
        make_judge_item(EASY, rng, wrong_share=0.0),
        make_judge_item(HARD, rng, wrong_share=1.0),
    ]
    right = '{"score": 5, "reason": "ok"}'
    score = score_judge(items, [right, "not json"])
    assert score.n == 2
    assert score.parsed == 0.5
    assert score.exact_agreement == 0.5
    assert score.correct_agreement == 0.5


def test_output_count_must_match():
    with pytest.raises(ValueError):
        score_triage([EASY], [])
