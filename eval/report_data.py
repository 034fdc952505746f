"""`stillhouse report`: one self-contained HTML page from the evaluation's results.

    stillhouse report [--since 2h] [--out report.html]

Turns the A/B report, the drift results, the judgments and the traffic records into the plain
`ReportData` the renderer draws. The one computation of its own is the fallback curve: quality
and student share as the confidence threshold moves, from judged requests whose student answer
has a score (served, or discarded by a fallback) and the teacher's mean score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import numpy as np

from stillhouse.common.formatting import not_nan
from stillhouse.common.roles import STUDENT_ROLES, Role
from stillhouse.common.traffic import MIRROR, TrafficRecord
from stillhouse.eval.ab_summary import AbSummary
from stillhouse.eval.report import ABEffect, ArmRow, DivergencePoint, FallbackPoint, ReportData
from stillhouse.eval.store import StoredJudgment
from stillhouse.eval.student_drift import StudentDrift

CURVE_POINTS = 25


def fallback_curve(
    points: Sequence[tuple[float, float]], teacher_quality: float, n: int = CURVE_POINTS
) -> list[FallbackPoint]:
    """For thresholds across the observed confidences: the share the student would serve
    (confidence >= threshold) and the mean quality served (the student's score where it
    serves, the teacher's mean score where it falls back)."""
    if not points:
        return []
    conf = np.array([c for c, _ in points])
    score = np.array([s for _, s in points])
    lo, hi = float(conf.min()), float(conf.max())
    thresholds = np.unique(np.concatenate([np.linspace(lo, hi, n), [hi + 1e-9]]))
    curve = []
    for t in thresholds:
        served = conf >= t
        quality = np.where(served, score, teacher_quality).mean()
        curve.append(FallbackPoint(float(t), float(served.mean()), float(quality)))
    return curve


def curve_inputs(
    records: Sequence[TrafficRecord], judgments: Sequence[StoredJudgment]
) -> tuple[list[tuple[float, float]], float | None]:
    """(confidence, student score) per judged request, and the teacher's mean score."""
    by_id = {r.request_id: r for r in records}
    points, teacher_scores = [], []
    for j in judgments:
        record = by_id.get(j.request_id)
        if record is None or j.status != "ok" or j.score is None:
            continue
        if j.kind == "single" and record.served_by == Role.TEACHER:
            teacher_scores.append(float(j.score))
        own = record.served_by in STUDENT_ROLES or record.served_by == MIRROR  # student answer
        student_scored = j.kind == "student" or (j.kind == "single" and own)
        if student_scored and record.confidence is not None:
            points.append((record.confidence, float(j.score)))
    teacher = float(np.mean(teacher_scores)) if teacher_scores else None
    return points, teacher


def build_report_data(
    ab: AbSummary,
    drift: Sequence[StudentDrift],
    records: Sequence[TrafficRecord],
    judgments: Sequence[StoredJudgment],
    confidence_threshold: float,
    notes: Sequence[str] = (),
) -> ReportData:
    missing: dict[str, str] = {}
    judge_scores = {
        arm: [
            j.score
            for j in judgments
            if j.kind == "single" and j.arm == arm and j.status == "ok" and j.score
        ]
        for arm in STUDENT_ROLES
    }
    if not any(judge_scores.values()):
        missing["judge-scores"] = "no judgments in the window: run `stillhouse judge`"
    divergence, threshold, states = _divergence_series(drift)
    if not divergence:
        missing["divergence"] = "no shadow records in the window (gateway.shadow.fraction)"
    effects = _effects(ab)
    if not effects:
        missing["ab-effect"] = "too few judged requests in one of the arms"
    points, teacher_quality = curve_inputs(records, judgments)
    curve = fallback_curve(points, teacher_quality) if teacher_quality is not None else []
    if not curve:
        missing["fallback-curve"] = (
            "needs judged student answers with a confidence and at least one judged "
            "teacher-served (fallback) answer"
        )
    return ReportData(
        title="Stillhouse evaluation report",
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        window=ab.window,
        arms=_arm_rows(ab),
        judge_scores=judge_scores,
        divergence=divergence,
        divergence_metric="KL(student ‖ teacher), k3 per token",
        drift_threshold=threshold,
        drift_state=", ".join(states) or "unknown",
        ab_effects=effects,
        fallback_curve=curve,
        fallback_threshold=confidence_threshold,
        quality_label="mean judge score served",
        ci_level=0.95,
        cost_unit="price units",
        extra_tables=_extra_tables(drift),
        notes=_notes(ab, notes),
        missing=missing,
    )


def _extra_tables(drift: Sequence[StudentDrift]) -> Mapping[str, Sequence[Mapping[str, object]]]:
    from stillhouse.eval.student_drift import drift_rows

    rows = drift_rows(drift)
    return {"divergence and drift per student": rows} if rows else {}


def _arm_rows(ab: AbSummary) -> list[ArmRow]:
    rows = []
    for arm in STUDENT_ROLES:
        s, p = ab.arms[arm], ab.pairwise[arm]
        cost = ab.cost.arms.get(arm)
        rows.append(
            ArmRow(
                arm=arm,
                n=s.n,
                role=arm,
                judge_mean=not_nan(s.judge_mean),
                judge_low=not_nan(s.judge_ci[0]),
                judge_high=not_nan(s.judge_ci[1]),
                pairwise_win_rate=not_nan(p.win_or_tie_rate),
                fallback_rate=not_nan(s.fallback_rate),
                error_rate=not_nan(s.error_rate),
                latency_p50_s=not_nan(s.latency_p50),
                latency_p99_s=not_nan(s.latency_p99),
                cost_per_request=not_nan(cost.per_request) if cost else None,
            )
        )
    return rows


def _divergence_series(
    drift: Sequence[StudentDrift],
) -> tuple[dict[str, list[DivergencePoint]], float | None, list[str]]:
    """Each student's divergence over time, the challenger's drift line, and the states."""
    divergence: dict[str, list[DivergencePoint]] = {}
    threshold, states = None, []
    for result in drift:
        points = [
            DivergencePoint(
                datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds"),
                w.k3_mean,
                w.k3_ci[0],
                w.k3_ci[1],
            )
            for ts, w in result.over_time
        ]
        if points:
            divergence[f"{result.arm} ({result.student_model})"] = points
        states.append(f"{result.arm} {result.state}")
        if result.calibration is not None and result.arm == Role.CHALLENGER:
            # The CUSUM works on standardised values; in k3 units, a shift of k (the
            # allowance) above the reference mean is where it starts to accumulate.
            cal = result.calibration
            threshold = cal.mean + cal.k * cal.std
    return divergence, threshold, states


def _effects(ab: AbSummary) -> list[ABEffect]:
    effects = []
    compared = (
        ("judge score, challenger − champion", ab.judge_verdict),
        ("pairwise vs teacher, challenger − champion", ab.pairwise_verdict),
    )
    for label, verdict in compared:
        s = verdict.sequential
        if verdict.difference is not None and s is not None:
            effects.append(ABEffect(label, verdict.difference.diff, s.low, s.high, verdict.verdict))
    return effects


def _notes(ab: AbSummary, notes: Sequence[str]) -> list[str]:
    out = list(notes) + list(ab.notes)
    srm = ab.srm
    if srm is not None:
        out.append(
            f"sample ratio: p = {srm.p_value:.3g} ({'ALARM' if srm.alarm else 'ok'}) against "
            f"an expected challenger share of {ab.expected_challenger_share or 0:.1%}"
        )
    for label, verdict in (("judge score", ab.judge_verdict), ("pairwise", ab.pairwise_verdict)):
        out.append(f"verdict on {label}: {verdict.verdict} ({verdict.reason})")
    return out
