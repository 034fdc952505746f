"""Cost: per-1k and GPU-hour arithmetic by hand, fallbacks paying for the student and the teacher,
the teacher-only counterfactual and savings, unknown token counts counted (never zero), failed
requests kept apart, and Price's one-mode validation."""

import math

import pytest

from stillhouse.common.traffic import TrafficRecord
from stillhouse.eval.cost import Price, Request, arm_costs, request_cost

TEACHER = Price(prompt_per_1k=0.01, completion_per_1k=0.03)
CHAMPION = Price(prompt_per_1k=0.001, completion_per_1k=0.002)
# 3.6 per GPU-hour at 1,000 tokens/s: 3.6 / 3600 / 1000 = 1e-6 per token.
CHALLENGER = Price(gpu_hour=3.6, tokens_per_s_per_gpu=1_000)
PRICES = {"teacher": TEACHER, "champion": CHAMPION, "challenger": CHALLENGER}


def test_per_1k_request_cost_by_hand():
    assert request_cost(1_000, 500, TEACHER) == pytest.approx(0.01 + 0.015)
    assert request_cost(0, 0, TEACHER) == 0.0


def test_gpu_hour_request_cost_counts_all_tokens_as_gpu_seconds():
    assert request_cost(1_000, 500, CHALLENGER) == pytest.approx(1_500 * 1e-6)
    # 360,000 tokens at 100 tok/s = one GPU-hour.
    assert request_cost(300_000, 60_000, Price(gpu_hour=2.5, tokens_per_s_per_gpu=100)) == (
        pytest.approx(2.5)
    )


@pytest.mark.parametrize("tokens", [(None, 10), (10, None), (-1, 10), (1.5, 10), (True, 1)])
def test_request_cost_rejects_unknown_or_invalid_counts(tokens):
    with pytest.raises(ValueError, match="non-negative integer"):
        request_cost(*tokens, TEACHER)


ROWS = [
    Request("champion", "champion", 1_000, 500),
    Request("champion", "teacher", 1_000, 500, student_completion_tokens=200),  # fallback
    Request("champion", "champion", None, 500),  # unknown prompt count
    Request("champion", "teacher", 1_000, 500),  # fallback, student's share unknown
    Request("champion", "none", None, None),  # failed
    Request("challenger", "challenger", 1_000, 500),
]


def test_fallback_pays_for_student_and_teacher():
    report = arm_costs(ROWS[1:2], PRICES)
    student = (1_000 * 0.001 + 200 * 0.002) / 1_000
    assert report.arms["champion"].total == pytest.approx(student + 0.025)
    assert report.arms["champion"].n_fallback == 1
    assert report.arms["champion"].savings < 0  # a fallback costs more than teacher-only


def test_arm_costs_by_hand():
    report = arm_costs(ROWS, PRICES)
    champion = report.arms["champion"]
    assert (champion.n_requests, champion.n_known, champion.n_unknown) == (5, 2, 2)
    assert (champion.n_failed, champion.n_fallback) == (1, 2)
    assert champion.total == pytest.approx(0.002 + 0.0264)
    assert champion.per_request == pytest.approx(0.0284 / 2)
    assert champion.teacher_only_total == pytest.approx(0.05)
    assert champion.teacher_only_per_request == pytest.approx(0.025)
    assert champion.savings == pytest.approx(0.05 - 0.0284)
    assert champion.savings_fraction == pytest.approx(0.0216 / 0.05)

    challenger = report.arms["challenger"]
    assert challenger.total == pytest.approx(0.0015)
    assert challenger.savings_fraction == pytest.approx(1 - 0.0015 / 0.025)

    overall = report.overall
    assert (overall.arm, overall.n_requests, overall.n_known, overall.n_unknown) == ("all", 6, 3, 2)
    assert overall.total == pytest.approx(0.0299)
    assert overall.teacher_only_total == pytest.approx(0.075)
    assert overall.savings == pytest.approx(0.075 - 0.0299)


def test_unknown_tokens_are_counted_not_taken_as_zero():
    report = arm_costs([Request("champion", "champion", None, None)], PRICES)
    champion = report.arms["champion"]
    assert (champion.n_unknown, champion.n_known, champion.total) == (1, 0, 0.0)
    assert math.isnan(champion.per_request) and math.isnan(champion.savings_fraction)


def test_traffic_records_are_rows_and_their_fallbacks_count_as_unknown():
    def record(served_by: str) -> TrafficRecord:
        return TrafficRecord(
            request_id="r", ts=0.0, endpoint="chat", arm="challenger", served_by=served_by,
            status=200, latency_s=0.1, prompt_tokens=1_000, completion_tokens=500,
        )  # fmt: skip

    report = arm_costs([record("challenger"), record("teacher")], PRICES)
    challenger = report.arms["challenger"]
    assert (challenger.n_known, challenger.n_unknown, challenger.n_fallback) == (1, 1, 1)
    assert challenger.total == pytest.approx(0.0015)


def test_missing_price_is_a_clear_error():
    with pytest.raises(ValueError, match="challenger"):
        arm_costs([Request("challenger", "challenger", 1, 1)], {"teacher": TEACHER})
    with pytest.raises(ValueError, match="teacher"):
        arm_costs([], {"champion": CHAMPION})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"prompt_per_1k": 1.0, "completion_per_1k": 1.0, "gpu_hour": 1.0}, "exactly one"),
        ({"prompt_per_1k": 1.0}, "both prompt_per_1k"),
        ({"gpu_hour": 1.0}, "both gpu_hour"),
        ({"prompt_per_1k": -1.0, "completion_per_1k": 1.0}, "non-negative"),
        ({"gpu_hour": 1.0, "tokens_per_s_per_gpu": 0.0}, "positive"),
        ({"gpu_hour": math.inf, "tokens_per_s_per_gpu": 10.0}, "non-negative"),
    ],
)
def test_price_needs_exactly_one_valid_mode(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Price(**kwargs)
