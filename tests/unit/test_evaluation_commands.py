"""The evaluation commands end to end over a synthetic traffic log (`eval_world`): judge (a
fake judge over HTTP), A/B, drift and report, with MLflow on SQLite in a temporary state dir."""

from __future__ import annotations

import pytest
from eval_world import SEED, SHARE, T0, eval_settings, write_traffic
from fake_judge import FakeJudge, serve
from fake_vllm import LoopThread
from rich.console import Console

from stillhouse.cli import evaluation
from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.traffic import AbChange, TrafficLogReader
from stillhouse.eval.store import EvalStore


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    loop = LoopThread()
    fake = FakeJudge()
    try:
        settings = eval_settings(tmp_path_factory.mktemp("eval-jobs"), serve(loop, fake))
        write_traffic(settings.traffic_log_path)
        yield settings, fake
    finally:
        loop.close()


@pytest.fixture(scope="module")
def judged(world):
    settings, fake = world
    result = evaluation.run_judge(settings, Console(quiet=True))
    return settings, fake, result


def test_judge_grades_a_sample_of_each_arm_and_compares_it_with_the_teacher(judged):
    settings, _, result = judged
    kinds = {(j.kind, j.arm) for j in result.judged}
    assert {("single", "champion"), ("single", "challenger"), ("pairwise", "challenger")} <= kinds
    singles = [j for j in result.judged if j.kind == "single"]
    assert len(singles) == 160 and all(j.status == "ok" for j in singles)
    # a fallback's discarded student answer is graded too, and the teacher's own answer is a
    # tie with the teacher without asking the judge
    assert any(j.kind == "student" for j in result.judged)
    teacher_pairs = [j for j in result.judged if j.kind == "pairwise" and j.served_by == "teacher"]
    assert teacher_pairs and all(j.outcome == "tie" for j in teacher_pairs)
    with EvalStore(settings.eval_db_path) as store:
        assert len(store.judgments(kind="single")) == 160


def test_a_second_judge_run_skips_what_was_judged(judged):
    settings, fake, _ = judged
    calls = len(fake.requests)
    again = evaluation.run_judge(settings, Console(quiet=True), sample=80)
    # only requests never judged before: the rest of each arm's pool, not the same sample
    first_ids = {j.request_id for j in judged[2].judged}
    assert not first_ids & {j.request_id for j in again.judged if j.kind == "single"}
    assert len(fake.requests) > calls


def test_ab_uses_the_share_the_log_recorded_and_finds_the_better_challenger(judged):
    settings, _, _ = judged
    report = evaluation.run_ab(settings, Console(quiet=True))
    assert report.expected_challenger_share == pytest.approx(SHARE)
    assert report.srm is not None and not report.srm.alarm  # 0.3 is what the users got
    assert report.judge_verdict.verdict == "better"
    assert report.arms["challenger"].judge_mean > report.arms["champion"].judge_mean
    fallback = report.arms["champion"].fallback_rate
    assert 0.1 < fallback < 0.2  # every 7th request fell back
    cost = report.cost.arms["champion"]
    assert cost.n_unknown == 0 and 0 < cost.savings_fraction < 1
    metrics = (settings.state_dir / "metrics" / "ab.prom").read_text()
    assert 'stillhouse_ab_verdict{metric="judge_score"} 1.0' in metrics


def test_ab_against_a_misconfigured_share_raises_the_srm_alarm(judged, tmp_path):
    settings, _, _ = judged
    with TrafficLogReader(settings.traffic_log_path) as log:
        records = log.records()
    from stillhouse.eval.ab_summary import build_ab_summary

    wrong = [AbChange(T0 - 1, 0.5, SEED, 0.0, SEED, "gateway-start")]  # said 50 %, got 30 %
    report = build_ab_summary(records, [], wrong, settings, "all")
    assert report.srm is not None and report.srm.alarm


def test_drift_flags_the_student_that_got_worse_and_not_the_other(judged):
    settings, _, _ = judged
    results = {r.arm: r for r in evaluation.run_drift(settings, Console(quiet=True))}
    assert results["challenger"].state == "drift"
    assert results["champion"].state == "ok"
    assert results["challenger"].reference_size == 60
    gauges = (settings.state_dir / "metrics" / "drift.prom").read_text()
    assert 'stillhouse_drift_state{arm="challenger"} 2.0' in gauges
    assert 'stillhouse_drift_state{arm="champion"} 0.0' in gauges


def test_report_writes_one_page_with_every_plot(judged, tmp_path):
    settings, _, _ = judged
    path = evaluation.run_report(settings, Console(quiet=True), out=tmp_path / "r.html")
    html = path.read_text()
    for plot in ("judge-scores", "divergence", "ab-effect", "fallback-curve"):
        assert f'data-plot="{plot}"' in html, plot
    assert "no data" not in html


def test_judge_without_a_traffic_log_is_one_clear_error(tmp_path):
    from stillhouse.common.errors import UsageError

    settings = Settings(state_dir=tmp_path)
    with pytest.raises(UsageError, match="no traffic log"):
        evaluation.run_ab(settings, Console(quiet=True))


def test_a_configured_judge_takes_references_from_the_configured_teacher(world):
    settings, _ = world
    with evaluation.judge_endpoints(settings, Console(quiet=True)) as ep:
        teacher = settings.gateway.engines.teacher
        assert isinstance(teacher, EngineRef)
        assert ep.judge_url == settings.evaluation.judge.base_url
        assert ep.reference_url == teacher.base_url
