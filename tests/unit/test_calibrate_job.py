"""`stillhouse calibrate` end to end against OpenAI-compatible engines over HTTP on loopback
(a small aiohttp student and teacher answering per prompt with chosen log-probabilities, the fake
judge), with MLflow on SQLite in a temporary state dir; and the job's pure parts, table-style."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from fake_judge import FakeJudge
from fake_judge import serve as serve_judge
from fake_vllm import LoopThread
from rich.console import Console

from stillhouse.common.calibration_tags import CALIBRATION_TAG_PREFIX as P
from stillhouse.common.calibration_tags import read_calibration
from stillhouse.common.config import Settings
from stillhouse.common.prompts import triage_answer, triage_user_message
from stillhouse.common.registry import RegistryClient, RegistryError
from stillhouse.rollout.calibration import job
from stillhouse.rollout.calibration.ltt import evaluate_threshold, ltt_threshold

HOLD, TAIL_LOGPROB = 8, -6.0  # tokens past the gateway's hold window are scored very low
N_CAL, N_GOOD, N_TEST = 80, 60, 40  # fresh prompts are numbered from 100
NO_LOGPROBS = 5  # this prompt's answer comes back without log-probabilities


def messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": triage_user_message(text)}]


def logprob_of(i: int) -> float:
    return -0.01 * (i % 100 + 1)


def student_reply(i: int) -> str:
    """The first N_GOOD answers agree with the teacher (another reply wording, GOOD for the
    judge); the rest name another category."""
    if i % 100 < N_GOOD:
        return triage_answer("billing", "high", f"GOOD, student words {i}")
    return triage_answer("account", "high", f"so-so {i}")


TEACHER_REPLY = triage_answer("billing", "high", "teacher words")


@dataclass
class Engine:
    """Answers `ticket i` / `fresh i` prompts: the student with 8 tokens at logprob_of(i) then 4
    at TAIL_LOGPROB; the teacher always TEACHER_REPLY. Counts the peak of concurrent calls."""

    role: str
    served_name: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0

    def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        ticket = body["messages"][-1]["content"].rsplit(" ", 1)[1]
        i = int(ticket) + (100 if "fresh" in body["messages"][-1]["content"] else 0)
        text = student_reply(i) if self.role == "student" else TEACHER_REPLY
        logprobs = None
        if body.get("logprobs") and i != NO_LOGPROBS:
            lps = [logprob_of(i)] * HOLD + [TAIL_LOGPROB] * 4
            k = body.get("top_logprobs") or 0
            logprobs = {
                "content": [
                    {
                        "token": f"t{j}",
                        "logprob": lp,
                        "bytes": [],
                        "top_logprobs": [
                            {"token": f"u{m}", "logprob": lp - m, "bytes": []} for m in range(k)
                        ],
                    }
                    for j, lp in enumerate(lps)
                ]
            }
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": "stop",
        }
        usage = {"prompt_tokens": 3, "completion_tokens": 12}
        return {
            "id": "c",
            "object": "chat.completion",
            "model": self.served_name,
            "choices": [choice],
            "usage": usage,
        }

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests.append(body)
            if body.get("model") != self.served_name:
                return web.json_response({"error": {"message": "no such model"}}, status=404)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(0.002)
            finally:
                self.in_flight -= 1
            return web.json_response(self.reply(body))

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


@dataclass
class World:
    state: Any
    student: Engine
    teacher: Engine
    student_url: str
    teacher_url: str
    judge_url: str
    registry: RegistryClient


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One SQLite MLflow store with three registered versions, the engines and the judge on
    loopback. The module runs in an empty working directory so nothing litters the checkout."""
    from mlflow import MlflowClient

    state = tmp_path_factory.mktemp("calibrate")
    loop = LoopThread()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path_factory.mktemp("cwd"))
            student, teacher = Engine("student", "student-v1"), Engine("teacher", "teacher")
            settings = make_settings(state, None)
            registry = RegistryClient.from_settings(settings)
            experiment = registry.ensure_experiment("stillhouse")
            mlflow = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
            model = state / "model"
            model.mkdir()
            (model / "config.json").write_text("{}")
            for n in range(3):
                run_id = mlflow.create_run(experiment).info.run_id
                registry.register_version(run_id, model, {"n": str(n)}, alias=None)
            yield World(
                state,
                student,
                teacher,
                loop.serve(student.app()) + "/v1",
                loop.serve(teacher.app()) + "/v1",
                serve_judge(loop, FakeJudge()),
                registry,
            )
    finally:
        loop.close()


def make_settings(state: Any, judge_url: str | None, **calibration: Any) -> Settings:
    return Settings.model_validate(
        {
            "state_dir": str(state),
            "gateway": {"confidence": {"hold_tokens": HOLD, "top_k": 3}},
            "evaluation": {"judge": {"base_url": judge_url}},
            "rollout": {
                "calibration": {
                    "epsilon": 0.1,
                    "delta": 0.1,
                    "max_tokens": 32,
                    "concurrency": 4,
                    **calibration,
                }
            },
        }
    )


def expected_labels(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.array([logprob_of(i) for i in range(start, start + count)])
    if start == 0:
        scores[NO_LOGPROBS] = -np.inf
    bad = np.array([(i % 100) >= N_GOOD for i in range(start, start + count)])
    return scores, bad


def run(w: World, settings: Settings, version: int, test: bool, **kw: Any) -> Any:
    args = dict(
        student_url=w.student_url,
        student_name="student-v1",
        teacher_url=w.teacher_url,
        teacher_name="teacher",
        prompts=[messages(f"ticket {i}") for i in range(N_CAL)],
        test_prompts=[messages(f"fresh {i}") for i in range(40, 80)] if test else None,
        console=Console(file=io.StringIO(), width=200, record=True),
    )
    args.update(kw)
    return job.calibrate_version(settings, version, **args)


@pytest.fixture(scope="module")
def matched(world):
    settings = make_settings(world.state, None)
    world.student.requests.clear()
    world.teacher.requests.clear()
    return settings, run(world, settings, 1, test=True)


# ---- teacher_match, end to end --------------------------------------------------------------


def test_the_threshold_is_ltt_on_scores_taken_exactly_as_the_gateway_scores(matched):
    _, outcome = matched
    scores, bad = expected_labels(0, N_CAL)
    # Scored over the first 8 tokens only: with the -6.0 tail the threshold would be near -2.
    start = Settings().rollout.calibration.start_errors
    assert outcome.result == ltt_threshold(scores, bad, epsilon=0.1, delta=0.1, start_errors=start)
    assert outcome.result.certified
    assert -0.7 < outcome.result.threshold < -0.5
    assert outcome.dropped == {}


def test_the_engines_are_asked_greedily_and_the_student_for_gateway_logprobs(matched, world):
    student = world.student.requests[0]
    assert student["temperature"] == 0.0 and student["max_tokens"] == 32
    assert student["logprobs"] is True and student["top_logprobs"] == 3
    assert student["model"] == "student-v1"
    teacher = world.teacher.requests[0]
    assert teacher["temperature"] == 0.0 and "logprobs" not in teacher
    assert len(world.student.requests) == len(world.teacher.requests) == N_CAL + N_TEST
    assert 2 <= world.student.peak <= 4  # concurrency 4, shared by student and teacher calls


def test_an_answer_without_logprobs_is_never_served(matched):
    _, outcome = matched
    scores, _ = expected_labels(0, N_CAL)
    assert outcome.result.n == N_CAL
    served = sum(s >= outcome.result.threshold for s in scores)
    assert outcome.result.n_served == served  # the -inf one is never among them


def test_the_fresh_split_reports_share_and_risk_at_the_chosen_threshold(matched):
    _, outcome = matched
    scores, bad = expected_labels(140, N_TEST)  # "fresh 40".."fresh 79", both sides of it
    share, risk, _ = evaluate_threshold(scores, bad, outcome.result.threshold, "served")
    assert (outcome.test_n, outcome.test_share, outcome.test_risk) == (N_TEST, share, risk)


def test_the_version_is_tagged_and_the_gateway_can_read_it_back(matched, world):
    settings, outcome = matched
    tags = world.registry.resolve("1").tags
    for key in (
        "threshold",
        "certified",
        "epsilon",
        "delta",
        "risk",
        "signal",
        "hold_tokens",
        "n",
        "student_share",
        "risk_hat",
        "risk_upper",
        "apgr",
        "calibrated_at",
        "test_share",
        "test_risk",
    ):
        assert P + key in tags
    assert tags[P + "certified"] == "true"
    cal, reason = read_calibration(tags, settings.gateway.confidence)
    assert reason is None and cal is not None
    assert cal.threshold == outcome.result.threshold  # the exact float, not a rounding
    assert cal.hold_tokens == HOLD and cal.signal == "mean_logprob"
    assert cal.test_share == pytest.approx(outcome.test_share)
    assert not any(k.startswith(P) for k in world.registry.resolve("3").tags)


def test_one_mlflow_run_holds_params_metrics_and_the_curve(matched, world):
    from mlflow import MlflowClient

    _, outcome = matched
    client = MlflowClient(matched[0].tracking_uri)
    r = client.get_run(outcome.run_id)
    assert r.info.run_name == "calibrate-v1" and r.info.status == "FINISHED"
    assert r.data.tags["stillhouse.job"] == "calibrate"
    assert r.data.tags["stillhouse.version"] == "1"
    assert r.data.params["calibration.epsilon"] == "0.1"
    assert r.data.metrics["threshold"] == pytest.approx(outcome.result.threshold)
    assert r.data.metrics["test.share"] == pytest.approx(outcome.test_share)
    assert 0.5 < r.data.metrics["apgr.router"] <= r.data.metrics["apgr.oracle"] + 1e-9
    assert "calibration_curve.json" in [a.path for a in client.list_artifacts(outcome.run_id)]
    assert world.registry.resolve("1").tags[P + "run_id"] == outcome.run_id


def test_the_printed_table_fits_in_80_columns(matched):
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(job.outcome_table(matched[1]))
    text = console.export_text()
    assert "certified" in text and "APGR" in text
    assert max(len(line) for line in text.splitlines()) <= 80


# ---- judge mode, failures ---------------------------------------------------------------------


def test_judge_mode_labels_with_the_judge_and_never_asks_the_teacher(world):
    settings = make_settings(world.state, world.judge_url, acceptable="judge", min_judge_score=5)
    before = len(world.teacher.requests)
    outcome = run(world, settings, 2, test=False)
    assert len(world.teacher.requests) == before
    scores, bad = expected_labels(0, N_CAL)  # the fake judge gives 5 only to GOOD answers
    start = Settings().rollout.calibration.start_errors
    assert outcome.result == ltt_threshold(scores, bad, epsilon=0.1, delta=0.1, start_errors=start)
    assert outcome.test_share is None
    assert P + "test_share" not in world.registry.resolve("2").tags


def test_a_missing_version_fails_before_any_engine_is_asked(world):
    before = len(world.student.requests)
    with pytest.raises(RegistryError):
        run(world, make_settings(world.state, None), 99, test=False)
    assert len(world.student.requests) == before


def test_a_student_that_answers_nothing_is_one_clear_error_and_tags_nothing(world):
    settings = make_settings(world.state, None)
    with pytest.raises(job.CalibrationError) as err:
        run(
            world,
            settings,
            3,
            test=False,
            student_name="no-such-model",
            prompts=[messages("ticket 1"), messages("ticket 2")],
        )
    assert "no answer could be labelled" in str(err.value) and "404" in str(err.value)
    assert "\n" not in str(err.value)
    assert not any(k.startswith(P) for k in world.registry.resolve("3").tags)


# ---- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student", "teacher", "agree"),
    [
        (triage_answer("billing", "high", "a"), triage_answer("billing", "high", "b"), True),
        (triage_answer("billing", "high", "a"), triage_answer("billing", "low", "a"), False),
        (triage_answer("billing", "high", "a"), triage_answer("account", "high", "a"), False),
        ("category: billing\npriority: high", triage_answer("billing", "high", "x"), True),
        ("  The answer is  42.\n", "the answer is 42.", True),
        ("The answer is 42.", "The answer is 43.", False),
        ("category: billing\nno priority", "category: billing\nno priority", True),
        ("", "", True),
    ],
)
def test_answers_agree_on_triage_fields_or_on_normalised_text(student, teacher, agree):
    assert job.answers_agree(student, teacher) is agree


def test_judge_question_is_the_ticket_for_the_demo_template_else_the_last_user_message():
    m = [{"role": "system", "content": "s"}, *messages("printer on fire")]
    assert job.judge_question(m, demo_template=True) == "printer on fire"
    assert job.judge_question(m, demo_template=False) == triage_user_message("printer on fire")
    assert job.judge_question([{"role": "user", "content": "hi"}], demo_template=True) is None


# ---- held-out prompts from the traffic log ----------------------------------------------------
