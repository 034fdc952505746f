"""A gate look judges and stores, but is not the `stillhouse judge` command: it opens no MLflow
run (the controller looks every tick; one run per look buried the real runs)."""

from __future__ import annotations

import pytest
from eval_world import T0, eval_settings, write_traffic
from fake_judge import FakeJudge, serve
from fake_vllm import LoopThread

from stillhouse.common.registry import RegistryClient
from stillhouse.eval.store import EvalStore
from stillhouse.rollout.controller.gate_check import evaluate_step


@pytest.fixture(scope="module")
def judge_url():
    loop = LoopThread()
    try:
        yield serve(loop, FakeJudge())
    finally:
        loop.close()


def test_a_gate_look_stores_its_judgments_and_opens_no_mlflow_run(tmp_path, judge_url):
    settings = eval_settings(tmp_path, judge_url)
    write_traffic(settings.traffic_log_path)
    registry = RegistryClient.from_settings(settings)
    with registry.session("count runs") as client:
        before = len(client.search_runs(experiment_ids=[registry.ensure_experiment("stillhouse")]))
    step = evaluate_step(
        settings, T0 - 1, judge_base_url=judge_url, judge_model="teacher", phase="ramp"
    )
    assert step.judged > 0
    with EvalStore(settings.eval_db_path) as store:
        assert len(store.judgments(judge_model="teacher")) == step.judged
    with registry.session("count runs") as client:
        after = client.search_runs(experiment_ids=[registry.ensure_experiment("stillhouse")])
    assert len(after) == before == 0
