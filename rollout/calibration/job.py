"""`stillhouse calibrate`: the fallback threshold of one student version, before it sees traffic.

    stillhouse calibrate 7          # or no version: the challenger (cli/rollout.run_calibrate)

The student answers every held-out prompt (`prompts.calibration_prompts`; greedy, with
log-probabilities) and is scored as the gateway scores it (the same signal over the first
`hold_tokens` tokens); each answer is labelled acceptable or not: it agrees with the teacher's
answer ("teacher_match") or the judge grades it at least `min_judge_score` ("judge").
`ltt.ltt_threshold` picks the threshold; the threshold and its held-out numbers go onto the
model version as tags (format and parser: common/calibration_tags.py), the run and the
quality-vs-share curve into MLflow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from stillhouse.common.calibration_tags import CALIBRATION_TAG_PREFIX, CalibrationTags
from stillhouse.common.chat import Messages
from stillhouse.common.config import ConfidenceSettings, Settings
from stillhouse.common.errors import StillhouseError, UsageError
from stillhouse.common.formatting import percent
from stillhouse.common.prompts import parse_triage_answer
from stillhouse.common.registry import RegistryClient
from stillhouse.common.tracking import RunTracker, flatten
from stillhouse.eval.judge_templates import ticket_from_logged_prompt
from stillhouse.rollout.calibration import ltt as calib
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.policy import FallbackPolicy

_TIMEOUT_S = 120.0
_ATTEMPTS = 3  # per call, on connection errors, timeouts, 429 and 5xx


class CalibrationError(StillhouseError):
    """Calibration could not label enough answers (every call failed, or no prompts)."""


# ---- the version tags (the format is common/calibration_tags) -----------------------------


def calibration_tags(
    result: calib.CalibrationResult,
    apgr: calib.Apgr,
    conf: ConfidenceSettings,
    calibrated_at: datetime,
    test_share: float | None = None,
    test_risk: float | None = None,
) -> dict[str, str]:
    """The version tags of one calibration, all strings."""
    r = result
    return CalibrationTags(
        threshold=float(r.threshold),
        certified=r.certified,
        signal=conf.signal,
        hold_tokens=conf.hold_tokens,
        quantile=float(conf.quantile),
        top_k=conf.top_k,
        epsilon=float(r.epsilon),
        delta=float(r.delta),
        risk=r.risk,
        n=r.n,
        student_share=float(r.student_share),
        risk_hat=float(r.risk_hat),
        risk_upper=float(r.risk_upper),
        apgr=float(apgr.router),
        calibrated_at=calibrated_at.astimezone(UTC).isoformat(timespec="seconds"),
        test_share=None if test_share is None else float(test_share),
        test_risk=None if test_risk is None else float(test_risk),
    ).to_tags()


def uncertified_tags(settings: Settings, reason: str) -> dict[str, str]:
    """The tags of a calibration that could label nothing: uncertified, with the reason (so
    the controller rolls the version back instead of calibrating it again and again)."""
    conf, cal = settings.gateway.confidence, settings.rollout.calibration
    tags = CalibrationTags(
        threshold=0.0,
        certified=False,
        signal=conf.signal,
        hold_tokens=conf.hold_tokens,
        quantile=conf.quantile,
        top_k=conf.top_k,
        epsilon=cal.epsilon,
        delta=cal.delta,
        risk=cal.risk,
        n=0,
        student_share=0.0,
        calibrated_at=datetime.now(UTC).isoformat(),
    ).to_tags()
    return {**tags, CALIBRATION_TAG_PREFIX + "error": reason[:500]}


# ---- labelling (pure) -----------------------------------------------------------------------


def normalise_answer(text: str) -> str:
    return " ".join(text.split()).casefold()


def answers_agree(student: str, teacher: str) -> bool:
    """Whether the student's answer agrees with the teacher's: for triage answers the same
    category and priority (the reply is free text, two good replies differ in wording);
    otherwise the same text up to whitespace and case."""
    a, b = parse_triage_answer(student), parse_triage_answer(teacher)
    if a is not None and b is not None:
        return (a.category, a.priority) == (b.category, b.priority)
    return normalise_answer(student) == normalise_answer(teacher)


def judge_question(messages: Messages, demo_template: bool) -> str | None:
    """What the judge is shown as the question (as `eval.judging.question_of` does for a logged
    prompt): the ticket text for the demo template, else the last user message."""
    if demo_template:
        return ticket_from_logged_prompt(json.dumps(messages))
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


# ---- asking the engines ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    text: str | None  # None: the call failed
    score: float = -math.inf
    error: str | None = None


@dataclass
class Labelled:
    """Scored, labelled student answers; `dropped` counts prompts that could not be labelled,
    by reason (a failed call, an unparseable judge verdict...)."""

    scores: list[float] = dataclasses.field(default_factory=list)
    unacceptable: list[bool] = dataclasses.field(default_factory=list)
    dropped: Counter[str] = dataclasses.field(default_factory=Counter)


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One chat completion; connection errors, timeouts, 429 and 5xx are retried."""
    why = ""
    for attempt in range(_ATTEMPTS):
        if attempt:
            await asyncio.sleep(0.2 * 2**attempt)
        try:
            resp = await client.post(f"{url}/chat/completions", json=body)
        except httpx.TransportError as e:
            why = type(e).__name__
            continue
        if resp.status_code == 200:
            return resp.json()
        why = f"HTTP {resp.status_code}: {' '.join(resp.text[:100].split())}"  # one line
        if resp.status_code != 429 and resp.status_code < 500:
            break  # the request itself is wrong (no such model...): asking again cannot help
    raise _CallFailed(why)


class _CallFailed(Exception):
    pass


async def _ask(
    client: httpx.AsyncClient,
    sem: asyncio.Semaphore,
    settings: Settings,
    who: tuple[str, str, str],  # (role, base URL, served name)
    messages: Messages,
) -> _Answer:
    """One greedy answer. The student is asked for log-probabilities and scored as the gateway
    scores it; the teacher's answer is only the reference."""
    role, url, name = who
    conf = settings.gateway.confidence
    body: dict[str, Any] = {
        "model": name,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": settings.rollout.calibration.max_tokens,
    }
    if role == "student":
        body.update(logprobs=True, top_logprobs=conf.top_k)
    async with sem:
        try:
            data = await _post(client, url, body)
            text = responses.answer_text(data, "chat")
            tokens = responses.token_logprobs(data, "chat") if role == "student" else None
        except _CallFailed as e:
            return _Answer(None, error=f"{role} {e}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return _Answer(None, error=f"{role} answer unreadable ({type(e).__name__})")
    return _Answer(text, FallbackPolicy(conf).score(tokens))  # scored as the gateway scores


@dataclass(frozen=True)
class Endpoints:
    student_url: str
    student_name: str
    teacher_url: str
    teacher_name: str


async def label_prompts(
    settings: Settings, ends: Endpoints, prompts: Sequence[Messages]
) -> Labelled:
    """Ask, score and label every prompt (bounded concurrency); failures are dropped, counted."""
    cal = settings.rollout.calibration
    out = Labelled()
    if not prompts:
        return out
    headers = settings.engine.auth_headers()
    async with httpx.AsyncClient(timeout=_TIMEOUT_S, headers=headers) as client:
        sem = asyncio.Semaphore(cal.concurrency)
        student = ("student", ends.student_url, ends.student_name)
        students = asyncio.gather(*(_ask(client, sem, settings, student, m) for m in prompts))
        if cal.acceptable == "judge":
            answers = await students  # graded by the judge below; no teacher answer needed
        else:
            teacher = ("teacher", ends.teacher_url, ends.teacher_name)
            teachers = asyncio.gather(*(_ask(client, sem, settings, teacher, m) for m in prompts))
            answers, references = await asyncio.gather(students, teachers)
            for s, t in zip(answers, references, strict=True):
                if s.text is None or t.text is None:
                    out.dropped[s.error or t.error or "failed"] += 1
                    continue
                out.scores.append(s.score)
                out.unacceptable.append(not answers_agree(s.text, t.text))
            return out
    await _judge_labels(settings, ends, prompts, answers, out)
    return out


async def _judge_labels(
    settings: Settings,
    ends: Endpoints,
    prompts: Sequence[Messages],
    answers: Sequence[_Answer],
    out: Labelled,
) -> None:
    """Judge mode: the judge grades each student answer; acceptable iff score ≥ the minimum.
    No judge URL configured: the teacher's endpoint judges, under the teacher's served name."""
    from stillhouse.eval.judge import Judge
    from stillhouse.eval.judge_templates import DemoJudgeTemplate
    from stillhouse.eval.judging import judge_config, make_template

    template = make_template(settings)
    configured = settings.evaluation.judge.base_url
    config = judge_config(settings, configured or ends.teacher_url)
    if configured is None:
        config = dataclasses.replace(config, model=ends.teacher_name)
    demo = isinstance(template, DemoJudgeTemplate)
    items: list[tuple[str, str, float]] = []
    for messages, answer in zip(prompts, answers, strict=True):
        question = judge_question(messages, demo)
        if answer.text is None:
            out.dropped[answer.error or "failed"] += 1
        elif question is None:
            out.dropped["no question for the judge"] += 1
        else:
            items.append((question, answer.text, answer.score))
    async with Judge(config, template) as judge:
        verdicts = await judge.grade_many([(q, a) for q, a, _ in items])
    for (_, _, score), verdict in zip(items, verdicts, strict=True):
        if verdict.status != "ok" or verdict.score is None:
            out.dropped[f"judge {verdict.status}"] += 1
            continue
        out.scores.append(score)
        out.unacceptable.append(verdict.score < settings.rollout.calibration.min_judge_score)


# ---- the job --------------------------------------------------------------------------------


@dataclass
class CalibrationOutcome:
    version: int
    result: calib.CalibrationResult
    curve: calib.RoutingCurve
    apgr: calib.Apgr
    dropped: dict[str, int]
    tags: dict[str, str]
    run_id: str
    test_n: int | None = None
    test_share: float | None = None
    test_risk: float | None = None
    test_dropped: dict[str, int] = dataclasses.field(default_factory=dict)


def calibrate_version(
    settings: Settings,
    version: int,
    *,
    student_url: str,
    student_name: str,
    teacher_url: str,
    teacher_name: str,
    prompts: list[Messages],
    test_prompts: list[Messages] | None,
    console: Console,
) -> CalibrationOutcome:
    """Calibrate `version` (served at `student_url`, an OpenAI base URL ending in /v1) on
    `prompts`, check the threshold on `test_prompts` if given, tag the version, log the run."""
    if not prompts:
        raise UsageError("no held-out prompts to calibrate on")
    cal, conf = settings.rollout.calibration, settings.gateway.confidence
    registry = RegistryClient.from_settings(settings)
    registry.resolve_version(version)  # a missing version fails now, not after every call
    ends = Endpoints(student_url.rstrip("/"), student_name, teacher_url.rstrip("/"), teacher_name)
    tracker = RunTracker(registry, settings.mlflow.experiment)
    run_tags = {"stillhouse.job": "calibrate", "stillhouse.version": str(version)}
    with tracker.run(f"calibrate-v{version}", run_tags) as run:
        params = {
            "version": version,
            "student": student_name,
            "teacher": teacher_name,
            "prompts": len(prompts),
            "test_prompts": len(test_prompts or ()),
            "calibration": cal.model_dump(),
            "confidence": conf.model_dump(),
        }
        run.log_params(flatten(params))
        with console.status(f"asking the student and labelling {len(prompts)} answers"):
            held = asyncio.run(label_prompts(settings, ends, prompts))
        result = _threshold(held, settings)
        curve = calib.routing_curve(held.scores, 1.0 - np.asarray(held.unacceptable, float))
        apgr = calib.apgr(curve)
        outcome = CalibrationOutcome(
            version, result, curve, apgr, dict(held.dropped), {}, run.run_id
        )
        if test_prompts:
            with console.status(f"checking the threshold on {len(test_prompts)} fresh prompts"):
                fresh = asyncio.run(label_prompts(settings, ends, test_prompts))
            _check_on_fresh(outcome, fresh, cal.risk)
        outcome.tags = calibration_tags(
            result, apgr, conf, datetime.now(UTC), outcome.test_share, outcome.test_risk
        )
        outcome.tags[CALIBRATION_TAG_PREFIX + "run_id"] = run.run_id
        run.log_metrics(_metrics(outcome))
        run.log_table(curve.rows(), "calibration_curve.json")
        registry.set_version_tags(version, outcome.tags)
    console.print(outcome_table(outcome))
    return outcome


def _threshold(held: Labelled, settings: Settings) -> calib.CalibrationResult:
    """Learn-then-Test on the labelled held-out answers (CalibrationError if there are none)."""
    if not held.scores:
        reasons = ", ".join(f"{k} ×{v}" for k, v in held.dropped.most_common(3))
        raise CalibrationError(f"no answer could be labelled ({reasons or 'no prompts'})")
    cal = settings.rollout.calibration
    return calib.ltt_threshold(
        held.scores,
        held.unacceptable,
        epsilon=cal.epsilon,
        delta=cal.delta,
        risk=cal.risk,
        max_candidates=cal.max_candidates,
        start_errors=cal.start_errors,
    )


def _check_on_fresh(outcome: CalibrationOutcome, fresh: Labelled, risk: calib.Risk) -> None:
    """What the chosen threshold does on a fresh labelled set, into `outcome`."""
    outcome.test_dropped = dict(fresh.dropped)
    if fresh.scores:
        outcome.test_n = len(fresh.scores)
        outcome.test_share, outcome.test_risk, _ = calib.evaluate_threshold(
            fresh.scores, fresh.unacceptable, outcome.result.threshold, risk
        )


def _metrics(o: CalibrationOutcome) -> dict[str, float]:
    r = o.result
    out = {
        "threshold": r.threshold,
        "certified": float(r.certified),
        "n": r.n,
        "n_served": r.n_served,
        "student_share": r.student_share,
        "risk_hat": r.risk_hat,
        "risk_upper": r.risk_upper,
        "p_value": r.p_value,
        "candidates_tested": r.candidates_tested,
        "dropped": sum(o.dropped.values()),
        "apgr.router": o.apgr.router,
        "apgr.oracle": o.apgr.oracle,
        "apgr.gain_over_random": o.apgr.gain_over_random,
        "quality.student_only": o.curve.student_only,
        "quality.teacher_only": o.curve.teacher_only,
    }
    if o.test_share is not None and o.test_risk is not None and o.test_n is not None:
        out.update({"test.n": o.test_n, "test.share": o.test_share, "test.risk": o.test_risk})
    return {k: float(v) for k, v in out.items()}


def outcome_table(o: CalibrationOutcome) -> Table:
    """The result in a two-column table (well under 80 columns)."""
    r = o.result
    table = Table(title=f"calibration of version {o.version} ({r.risk} risk)")
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    state = "certified" if r.certified else "NOT certified: serve almost nothing"
    rows = [
        ("threshold", f"{r.threshold:.4f} ({state})"),
        ("target", f"risk ≤ {r.epsilon:g} with prob. ≥ {1 - r.delta:g}"),
        ("held-out answers", f"{r.n} ({sum(o.dropped.values())} dropped)"),
        ("student share", f"{percent(r.student_share)} ({r.n_served} served)"),
        ("risk (upper bound)", f"{r.risk_hat:.3f} ({r.risk_upper:.3f})"),
        ("APGR router / oracle", f"{o.apgr.router:.3f} / {o.apgr.oracle:.3f}"),
        ("gain over random", f"{percent(o.apgr.gain_over_random)} of the oracle's"),
    ]
    if o.test_share is not None and o.test_risk is not None:
        rows.append(("fresh split", f"share {percent(o.test_share)}, risk {o.test_risk:.3f}"))
    if o.apgr.note:
        rows.append(("note", o.apgr.note[:50]))
    for key, value in rows:
        table.add_row(key, value)
    return table
