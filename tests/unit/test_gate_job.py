"""One look at a rollout step's gates end to end over the synthetic traffic log of `eval_world`
(a fake judge over HTTP; MLflow on SQLite in a temporary state dir)."""

from __future__ import annotations

import sqlite3

import pytest
from eval_world import T0, eval_settings, write_traffic
from fake_judge import FakeJudge, serve
from fake_vllm import LoopThread

from stillhouse.common.traffic import TrafficLogReader
from stillhouse.eval.store import EvalStore
from stillhouse.rollout.controller.gate_check import evaluate_step


@pytest.fixture(scope="module")
def judge():
    loop = LoopThread()
    fake = FakeJudge()
    try:
        yield serve(loop, fake), fake
    finally:
        loop.close()


def look(settings, since_ts: float, url: str, phase: str):
    return evaluate_step(settings, since_ts, judge_base_url=url, judge_model="teacher", phase=phase)


@pytest.fixture
def world(tmp_path, judge):
    url, fake = judge
    settings = eval_settings(tmp_path, url)
    controller = settings.rollout.controller.model_copy(update={"judge_sample": 60})
    rollout = settings.rollout.model_copy(update={"controller": controller})
    settings = settings.model_copy(update={"rollout": rollout})
    write_traffic(settings.traffic_log_path)
    return settings, url, fake


def test_a_ramp_step_judges_both_arms_and_fails_the_challenger_that_drifted(world, capsys):
    settings, url, _ = world
    step = look(settings, T0 - 1, url, "ramp")
    with TrafficLogReader(settings.traffic_log_path) as log:
        challenger = [r for r in log.records() if r.arm == "challenger"]
    assert step.challenger_requests == len(challenger) and step.mirrored == 0
    assert step.evidence.challenger.pairwise_n == 60 and step.evidence.champion.pairwise_n == 60
    assert step.judged > 0
    status = {r.name: r.status for r in step.gates.results}
    # the challenger's answers are better and its split is what the log recorded ...
    assert status["not_worse"] == status["win_or_tie"] == status["srm"] == "pass"
    assert status["fallback"] == status["latency"] == "pass"
    # ... but its divergence to the teacher doubled halfway through the window
    assert status["divergence"] == "fail" and step.gates.status == "fail"
    assert capsys.readouterr().out == ""  # no console given: quiet


def test_a_second_look_adds_judgments_to_the_same_window(world):
    settings, url, _ = world
    first = look(settings, T0 - 1, url, "ramp")
    second = look(settings, T0 - 1, url, "ramp")
    assert second.evidence.champion.pairwise_n == 2 * first.evidence.champion.pairwise_n


def test_the_window_starts_at_since_ts(world):
    settings, url, _ = world
    since = T0 + 400
    step = look(settings, since, url, "ramp")
    with TrafficLogReader(settings.traffic_log_path) as log:
        later = [r for r in log.records() if r.ts >= since and r.arm == "challenger"]
    assert step.challenger_requests == len(later) < 100
    with EvalStore(settings.eval_db_path) as store:
        assert min(j.ts for j in store.judgments()) >= since


def test_a_mirror_step_counts_mirrors_and_takes_their_would_be_fallbacks(world):
    settings, url, _ = world
    # The mirror phase: the challenger serves no one; its answers are mirrored. Every 7th
    # request of the world fell back, so the mirror's fallback_reason says the challenger would.
    conn = sqlite3.connect(settings.traffic_log_path)
    with conn:
        conn.execute("UPDATE requests SET served_by = 'mirror' WHERE arm = 'challenger'")
    conn.close()
    step = look(settings, T0 - 1, url, "mirror")
    with TrafficLogReader(settings.traffic_log_path) as log:
        mirrors = [r for r in log.records() if r.served_by == "mirror"]
    assert step.mirrored == len(mirrors) and step.challenger_requests == 0
    expected = sum(r.fallback_reason is not None for r in mirrors) / len(mirrors)
    assert step.evidence.challenger.fallback_rate == pytest.approx(expected) and expected > 0.1
    for name in ("srm", "latency"):
        assert "not applicable in the mirror phase" in step.gates.result(name).detail
    assert step.gates.result("win_or_tie").status == "pass"
