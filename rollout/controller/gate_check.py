"""One look at the gates of a rollout step: judge, measure, decide (the I/O around `rollout.gates`).

    check = evaluate_step(settings, step_started_at, judge_base_url=url, judge_model="teacher",
                          phase="ramp")          # or "mirror"
    check.gates.status   # "pass" | "fail" | "inconclusive"

The window is [since_ts, now): everything the current step produced. Each call judges up to
`rollout.controller.judge_sample` not-yet-judged requests per arm (the judge store skips what
earlier looks judged), so the judged sample grows look by look while the A/B results read every
judgment of the window; the sequential not-worse gate is valid at every such look.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from stillhouse.common.config import Settings
from stillhouse.common.roles import Role
from stillhouse.common.traffic import MIRROR, TrafficRecord
from stillhouse.eval.ab_summary import ab_summary_for_window
from stillhouse.eval.abtest import wilson_interval
from stillhouse.eval.judging import JudgeEndpoints, judge_selection, select_for_judging
from stillhouse.eval.student_drift import drift_for_window
from stillhouse.eval.window import Window
from stillhouse.rollout.gates import (
    GateEvaluation,
    GateEvidence,
    GatePhase,
    evaluate_gates,
    evidence_from,
)


@dataclass(frozen=True)
class StepEvaluation:
    """One look at a step's gates, with the evidence behind it and what the window held."""

    gates: GateEvaluation
    evidence: GateEvidence
    window: str
    challenger_requests: int  # answered to users by the challenger arm (mirrors excluded)
    mirrored: int  # challenger answers to mirrored requests
    judged: int  # judgments made by this call (single + pairwise + student)


def with_judge(settings: Settings, base_url: str, model: str) -> Settings:
    """Settings whose judge is the given endpoint and model (judgments are stored and read back
    under the judge model's name, so both must agree)."""
    judge = settings.evaluation.judge.model_copy(update={"base_url": base_url, "model": model})
    evaluation = settings.evaluation.model_copy(update={"judge": judge})
    return settings.model_copy(update={"evaluation": evaluation})


def endpoints_for(settings: Settings, judge_base_url: str, judge_model: str) -> JudgeEndpoints:
    """Pairwise references come from a running teacher when one is configured; otherwise the
    judge is taken to be the teacher (as in the demo, where the teacher also judges)."""
    teacher = settings.gateway.engines.teacher
    if teacher is not None and teacher.base_url is not None:
        return JudgeEndpoints(
            judge_base_url, teacher.base_url, teacher.served_name or Role.TEACHER.value
        )
    return JudgeEndpoints(judge_base_url, judge_base_url, judge_model)


def mirror_fallback(
    records: Sequence[TrafficRecord], alpha: float
) -> tuple[int, float, tuple[float, float]]:
    """Mirrored answers, and the share the challenger would have handed to the teacher (a
    mirrored record's `fallback_reason` says what the gateway would have done; the A/B results'
    challenger rate counts them too, but mixed with any challenger-arm users)."""
    mirrored = [r for r in records if r.arm == Role.CHALLENGER and r.served_by == MIRROR]
    n, k = len(mirrored), sum(r.fallback_reason is not None for r in mirrored)
    return n, (k / n if n else float("nan")), wilson_interval(k, n, 1 - alpha)


def evaluate_step(
    settings: Settings,
    since_ts: float,
    *,
    judge_base_url: str,
    judge_model: str,
    phase: GatePhase,
) -> StepEvaluation:
    settings = with_judge(settings, judge_base_url, judge_model)
    window = Window(since_ts, None)
    # Judging only, stored for the A/B summary below: no MLflow run, nothing printed per look.
    selection = select_for_judging(settings, window, settings.rollout.controller.judge_sample)
    endpoints = endpoints_for(settings, judge_base_url, judge_model)
    judged = judge_selection(settings, selection, endpoints)
    ab, records, _ = ab_summary_for_window(settings, window)
    drift = drift_for_window(settings, window)
    evidence = evidence_from(ab, drift)
    mirrored, rate, ci = mirror_fallback(records, settings.rollout.gates.alpha)
    if phase == "mirror" and mirrored:
        challenger = replace(evidence.challenger, fallback_rate=rate, fallback_ci=ci)
        evidence = replace(evidence, challenger=challenger)
    gates = evaluate_gates(evidence, settings.rollout.gates, phase=phase)
    served = sum(r.arm == Role.CHALLENGER and r.served_by != MIRROR for r in records)
    return StepEvaluation(
        gates=gates,
        evidence=evidence,
        window=window.label,
        challenger_requests=served,
        mirrored=mirrored,
        judged=len(judged.judged),
    )
