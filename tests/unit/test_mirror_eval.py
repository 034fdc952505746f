"""Evaluation over mirrored challenger answers (the mirror phase, served_by "mirror"): the
sample-ratio check ignores them, fallback rates count the ones that would have fallen back,
the cost leaves them out and the judge samples them as the challenger's."""

from __future__ import annotations

import math

import pytest

from stillhouse.common.config import Settings
from stillhouse.common.traffic import MIRROR, AbChange, TrafficRecord
from stillhouse.eval.ab_summary import build_ab_summary, fell_back, srm_units
from stillhouse.eval.judging import select_sample

T0 = 1_700_000_000.0


def record(i: int, arm: str, served_by: str, **kw) -> TrafficRecord:
    base = dict(
        request_id=f"r{i}",
        ts=T0 + i,
        endpoint="chat",
        arm=arm,
        served_by=served_by,
        status=200,
        latency_s=0.1,
        prompt_tokens=30,
        completion_tokens=20,
        user_hash=f"u{i}",
        prompt='[{"role": "user", "content": "hi"}]',
        answer=f"answer {i}",
    )
    base.update(kw)
    return TrafficRecord(**base)


def mirror_world(n: int = 100) -> list[TrafficRecord]:
    """Every user on the champion (share 0); each request mirrored to the challenger, which
    would have fallen back on every 4th; the champion fell back on every 10th."""
    records = []
    for i in range(n):
        champion_fb = i % 10 == 0
        records.append(
            record(
                i,
                "champion",
                "teacher" if champion_fb else "champion",
                fallback_reason="low_confidence" if champion_fb else None,
                student_completion_tokens=8 if champion_fb else None,
            )
        )
        records.append(
            record(
                i,
                "challenger",
                MIRROR,
                request_id=f"r{i}:mirror",
                ts=T0 + i + 0.5,
                fallback_reason="low_confidence" if i % 4 == 0 else None,
                answer=f"challenger {i}",
            )
        )
    return records


def test_the_sample_ratio_check_ignores_mirrored_answers():
    records = mirror_world()
    changes = [AbChange(T0 - 1, 0.0, "s", 0.0, "s", "gateway-start")]
    units, share = srm_units(records, changes, 0.1)
    assert units == {"champion": 100, "challenger": 0} and share == 0.0
    report = build_ab_summary(records, [], changes, Settings(), "test")
    assert report.units == {"champion": 100, "challenger": 0}
    assert report.srm is not None and not report.srm.alarm


def test_fallback_rates_count_mirrored_answers_that_would_have_fallen_back():
    records = mirror_world()
    report = build_ab_summary(records, [], [], Settings(), "test")
    assert report.arms["challenger"].n == 100
    assert report.arms["challenger"].fallback_rate == pytest.approx(0.25)
    assert report.arms["champion"].fallback_rate == pytest.approx(0.10)
    assert report.arms["challenger"].error_rate == 0.0


def test_fallback_rules_for_ordinary_records_are_unchanged():
    assert fell_back(record(1, "champion", "teacher", fallback_reason="timeout"))
    assert not fell_back(record(2, "champion", "champion"))
    # the teacher failed too: an error, not a fallback
    failed = record(3, "champion", "none", status=503, fallback_reason="timeout")
    assert not fell_back(failed)
    report = build_ab_summary([failed], [], [], Settings(), "test")
    assert report.arms["champion"].error_rate == 1.0


def test_a_failed_mirror_counts_as_a_would_be_fallback_not_an_error():
    failed = record(
        1, "challenger", MIRROR, status=502, fallback_reason="upstream_5xx", answer=None
    )
    rejected = record(2, "challenger", MIRROR, status=400, answer=None)  # the challenger's 4xx
    report = build_ab_summary([failed, rejected], [], [], Settings(), "test")
    challenger = report.arms["challenger"]
    assert challenger.fallback_rate == 0.5 and challenger.error_rate == 0.5


def test_the_cost_leaves_mirrored_answers_out_and_says_so():
    records = mirror_world()
    report = build_ab_summary(records, [], [], Settings(), "test")
    assert "challenger" not in report.cost.arms
    assert report.cost.arms["champion"].n_requests == 100
    assert report.cost.overall.n_requests == 100
    assert any("100 mirrored challenger answers" in note for note in report.notes)


def test_the_judge_samples_mirrored_answers_as_the_challengers():
    records = mirror_world(20)
    sample = select_sample(records, per_arm=50, skip=set())
    assert len(sample["challenger"]) == 20
    assert all(r.served_by == MIRROR and r.arm == "challenger" for r in sample["challenger"])
    # a failed mirror has no answer to judge
    failed = record(99, "challenger", MIRROR, status=502, answer=None, fallback_reason="timeout")
    assert select_sample([failed], per_arm=5, skip=set())["challenger"] == []
    assert math.isnan(build_ab_summary([], [], [], Settings(), "t").arms["challenger"].error_rate)


def test_a_mirrored_answer_that_would_fall_back_is_judged_as_the_teachers(tmp_path):
    """What the user would have received is the teacher's answer: a tie against it, graded as
    the teacher's; the discarded challenger answer is graded as the student's, never compared."""
    import asyncio
    import json as _json

    from eval_world import eval_settings
    from fake_judge import FakeJudge, serve
    from fake_vllm import LoopThread

    from stillhouse.common.prompts import triage_user_message
    from stillhouse.eval.judging import judge_sample, would_fall_back

    prompt = _json.dumps([{"role": "user", "content": triage_user_message("charged twice")}])
    unsure = record(
        1,
        "challenger",
        MIRROR,
        request_id="r1:mirror",
        prompt=prompt,
        fallback_reason="low_confidence",
        answer="category: UNSURE",
    )
    sure = record(
        2, "challenger", MIRROR, request_id="r2:mirror", prompt=prompt, answer="category: SURE"
    )
    assert would_fall_back(unsure) and not would_fall_back(sure)
    assert not would_fall_back(
        record(3, "challenger", MIRROR, status=502, fallback_reason="timeout")
    )
    loop = LoopThread()
    fake = FakeJudge()
    try:
        url = serve(loop, fake)
        settings = eval_settings(tmp_path, url)
        result = asyncio.run(
            judge_sample(settings, {"challenger": [unsure, sure]}, url, url, "teacher")
        )
    finally:
        loop.close()
    by = {(j.request_id, j.kind): j for j in result.judged}
    assert by[("r1:mirror", "pairwise")].outcome == "tie"
    assert ("r1:mirror", "student") in by and ("r2:mirror", "student") not in by
    assert ("r2:mirror", "pairwise") in by
    shown = [_json.dumps(body["messages"]) for body in fake.requests]
    unsure_shown = [text for text in shown if "UNSURE" in text]
    assert len(unsure_shown) == 1  # graded once as the student's, never compared
