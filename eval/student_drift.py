"""Per-student divergence from the teacher over a window, and whether it drifted from the
student's reference (set at promotion, or its first `reference_size` shadow records ever,
fixed once chosen), with the CUSUM calibrated on that reference.

    results = drift_for_window(settings, window)   # `stillhouse drift`, and the gates

Details: docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stillhouse.common.config import Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.eval_settings import DriftSettings
from stillhouse.common.traffic import ShadowRecord, TrafficLogReader
from stillhouse.eval.divergence import (
    RequestDivergence,
    WindowDivergence,
    bucket_by_time,
    request_divergence,
    window_divergence,
)
from stillhouse.eval.drift import (
    DriftAssessment,
    DriftConfig,
    NoSpreadError,
    SequentialCalibration,
    assess_drift,
    calibrate_sequential,
)
from stillhouse.eval.store import EvalStore
from stillhouse.eval.window import Window

STATE_VALUE = {"ok": 0, "warn": 1, "drift": 2}
BUCKETS_PER_WINDOW = 20


@dataclass(frozen=True)
class StudentDrift:
    student_model: str
    arm: str  # champion / challenger / "unknown" (its requests are outside the window)
    divergence: WindowDivergence | None  # the current window (None: no records in it)
    over_time: list[tuple[float, WindowDivergence]]
    reference_size: int
    reference_source: str
    calibration: SequentialCalibration | None
    assessment: DriftAssessment | None  # None: the reference is still filling up
    note: str = ""

    @property
    def state(self) -> str:
        return "collecting" if self.assessment is None else str(self.assessment.state)


def divergences(records: Sequence[ShadowRecord]) -> list[RequestDivergence]:
    """Per-request divergence; a record that cannot be scored (empty answer) is left out."""
    out = []
    for record in records:
        try:
            out.append(request_divergence(record))
        except ValueError:
            continue
    return out


def psi_bins(n_reference: int, n_current: int) -> int:
    """Fewer bins for smaller windows. PSI is biased upward by sampling noise, by about
    (bins − 1)·(1/n_ref + 1/n_cur): ten bins on 60 reference records alone average 0.18, past
    the conventional 0.1 "warn" with nothing changed. About 25 records per bin keeps that bias
    near 0.05 or below."""
    return max(3, min(10, min(n_reference, n_current) // 25))


def drift_config(settings: DriftSettings, n_reference: int, n_current: int) -> DriftConfig:
    return DriftConfig(
        warn_alpha=settings.warn_alpha,
        drift_alpha=settings.drift_alpha,
        psi_warn=settings.psi_warn,
        psi_drift=settings.psi_drift,
        psi_bins=psi_bins(n_reference, n_current),
        min_samples=settings.min_current,
    )


def bucket_seconds(items: Sequence[RequestDivergence], configured: float | None) -> float:
    if configured is not None:
        return configured
    if not items:
        return 60.0
    span = max(d.ts for d in items) - min(d.ts for d in items)
    return max(1.0, span / BUCKETS_PER_WINDOW)


def student_drift(
    student_model: str,
    arm: str,
    current: Sequence[RequestDivergence],
    reference: Sequence[float] | None,
    reference_source: str,
    settings: DriftSettings,
    seed: int = 0,
) -> StudentDrift:
    """One student's divergence and drift decision; `reference` None: not enough records yet."""
    window = window_divergence(current) if current else None
    over_time = (
        bucket_by_time(current, bucket_seconds(current, settings.bucket_s)) if current else []
    )
    if reference is None:
        return StudentDrift(
            student_model,
            arm,
            window,
            over_time,
            0,
            reference_source,
            None,
            None,
            f"reference needs {settings.reference_size} shadow records; {len(current)} so far",
        )
    values = [d.k3 for d in current]
    try:
        calibration = calibrate_sequential(
            reference,
            stream_length=max(len(values), settings.min_current),
            false_alarm_rate=settings.false_alarm_rate,
            seed=seed,
        )
    except NoSpreadError:
        return StudentDrift(
            student_model,
            arm,
            window,
            over_time,
            len(reference),
            reference_source,
            None,
            None,
            "the reference divergences have no spread (the student matches the teacher token "
            "for token), so there is no noise floor to detect drift against",
        )
    config = drift_config(settings, len(reference), len(values))
    assessment = assess_drift(reference, values, calibration, config)
    return StudentDrift(
        student_model,
        arm,
        window,
        over_time,
        len(reference),
        reference_source,
        calibration,
        assessment,
    )


def split_reference(
    items: Sequence[RequestDivergence], size: int
) -> tuple[list[float] | None, set[str]]:
    """The first `size` records' k3 (oldest first) and their request ids; None if too few."""
    ordered = sorted(items, key=lambda d: d.ts)
    if len(ordered) < size:
        return None, set()
    head = ordered[:size]
    return [d.k3 for d in head], {d.request_id for d in head}


def by_student(items: Sequence[RequestDivergence]) -> dict[str, list[RequestDivergence]]:
    grouped: dict[str, list[RequestDivergence]] = {}
    for item in items:
        grouped.setdefault(item.student_model or "unknown", []).append(item)
    return grouped


def arm_of(student_model: str, arms: Mapping[str, str]) -> str:
    return arms.get(student_model, "unknown")


def drift_rows(results: Sequence[StudentDrift]) -> list[dict[str, object]]:
    rows = []
    for r in results:
        d, rep = r.divergence, r.assessment
        tests = rep.tests if rep else None
        rows.append(
            {
                "arm": r.arm,
                "student": r.student_model,
                "n": d.n if d else 0,
                "kl_k3": d.k3_mean if d else None,
                "kl_k3_low": d.k3_ci[0] if d else None,
                "kl_k3_high": d.k3_ci[1] if d else None,
                "kl_k1": d.k1_mean if d else None,
                "top1_agreement": d.top1_agreement if d else None,
                "topk_bound": d.topk_bound if d else None,
                "reference": r.reference_size,
                "ks_p": tests.ks_pvalue if tests else None,
                "mw_p": tests.mw_pvalue if tests else None,
                "psi": tests.psi if tests else None,
                "cusum_max": rep.sequential_statistic if rep else None,
                "cusum_h": rep.sequential_threshold if rep else None,
                "state": r.state,
            }
        )
    return rows


def drift_metrics(results: Sequence[StudentDrift]) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in drift_rows(results):
        prefix = str(row["arm"])
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
                out[f"{prefix}.{key}"] = float(value)
        out[f"{prefix}.state"] = float(STATE_VALUE.get(str(row["state"]), -1))
    return out


def drift_for_window(settings: Settings, window: Window) -> list[StudentDrift]:
    """Each student's divergence over `window` and its drift against its reference. A student
    without a stored reference gets one now: its first `reference_size` shadow records ever
    (not just this window's), fixed once in the evaluation store."""
    ds = settings.evaluation.drift
    path = settings.traffic_log_path
    if not path.is_file():
        raise UsageError(f"no traffic log at {path}: serve traffic first")
    with TrafficLogReader(path) as log, EvalStore(settings.eval_db_path) as store:
        current_all = divergences(log.shadow(since=window.since, until=window.until))
        records = log.records(since=window.since, until=window.until)
        arms = {r.student_model: r.arm for r in records if r.student_model}
        results = []
        for student, items in by_student(current_all).items():
            ref = store.reference(student)
            in_ref: set[str] = set()
            if ref is not None:
                reference, source = list(ref.values), ref.source
            else:
                source = "first-records"
                history = [d for d in divergences(log.shadow()) if d.student_model == student]
                reference, in_ref = split_reference(history, ds.reference_size)
                if reference is not None:
                    store.set_reference(student, reference, source)
            current = [d for d in items if d.request_id not in in_ref]
            arm = arm_of(student, arms)
            results.append(student_drift(student, arm, current, reference, source, ds))
    return results
