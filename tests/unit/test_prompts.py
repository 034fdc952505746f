import pytest

from stillhouse.common.prompts import (
    judge_verdict,
    parse_triage_answer,
    parse_verdict,
    render_verdict,
    triage_answer,
)

PRIOS = ("low", "medium", "high")


def test_triage_answer_round_trips():
    text = triage_answer("billing", "high", "we will call you.")
    answer = parse_triage_answer(text)
    assert answer is not None
    assert (answer.category, answer.priority, answer.reply) == (
        "billing",
        "high",
        "we will call you.",
    )


def test_triage_answer_without_reply_still_parses():
    answer = parse_triage_answer(" category: shipping\npriority: low")
    assert answer is not None and answer.category == "shipping" and answer.reply == ""


@pytest.mark.parametrize("text", ["", "billing high", "category billing\npriority: low", "{}"])
def test_text_outside_the_triage_format_does_not_parse(text):
    assert parse_triage_answer(text) is None


@pytest.mark.parametrize(
    ("category", "priority", "score"),
    [
        ("billing", "high", 5),
        ("billing", "medium", 4),
        ("billing", "low", 3),
        ("shipping", "high", 2),
        ("shipping", "low", 1),
    ],
)
def test_verdict_rubric(category, priority, score):
    verdict = judge_verdict("billing", "high", category, priority, PRIOS)
    assert verdict["score"] == score
    assert isinstance(verdict["reason"], str) and verdict["reason"]


def test_rendered_verdict_parses_back():
    verdict = judge_verdict("billing", "high", "shipping", "low", PRIOS)
    assert parse_verdict(render_verdict(verdict)) == verdict


@pytest.mark.parametrize(
    "text",
    [
        "",
        "score: 5",
        '{"score": 6, "reason": "x"}',
        '{"score": 0, "reason": "x"}',
        '{"score": "5", "reason": "x"}',
        '{"score": true, "reason": "x"}',
        '{"score": 5}',
        '[5, "x"]',
        '{"score": 5, "reason": "x"',
    ],
)
def test_verdict_parse_is_strict(text):
    assert parse_verdict(text) is None


def test_pairwise_verdict_reasons_first_and_the_higher_score_wins():
    from stillhouse.common.prompts import pairwise_verdict, parse_pairwise_verdict, render_verdict

    right = {"score": 5, "reason": "category and priority are correct"}
    wrong = {"score": 2, "reason": "category should be billing"}
    verdict = pairwise_verdict(wrong, right)
    assert list(verdict) == ["reason", "winner"]  # what the model writes first
    assert verdict["winner"] == "b"
    assert verdict["reason"] == (
        "a scores 2 (category should be billing); b scores 5 (category and priority are correct)"
    )
    assert pairwise_verdict(right, dict(right))["winner"] == "tie"
    assert parse_pairwise_verdict(render_verdict(verdict)) == {
        "winner": "b", "reason": verdict["reason"]
    }  # fmt: skip
    for bad in ('{"winner": "c", "reason": ""}', '{"winner": "a"}', "[]", "not json"):
        assert parse_pairwise_verdict(bad) is None
