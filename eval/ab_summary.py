"""The A/B test's state over a window of the traffic log (what `stillhouse ab` prints and the
rollout gates read).

    summary, records, judgments = ab_summary_for_window(settings, window)

Per arm: judge scores, pairwise results against the teacher, fallback rate, latency and cost
(with the savings against sending everything to the teacher). Across arms: the sample-ratio
check against the share that was in force (from the log's A/B history), and challenger vs
champion on the judge score with a fixed-n interval, an always-valid sequential interval, the
minimum detectable effect at this sample size and a verdict. Reading and deciding only: the
numbers come from `stillhouse.eval.abtest` and `stillhouse.eval.cost`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stillhouse.common.config import Settings
from stillhouse.common.roles import STUDENT_ROLES, Role
from stillhouse.common.traffic import MIRROR, AbChange, TrafficLogReader, TrafficRecord
from stillhouse.eval.abtest import (
    AbConfig,
    AbVerdict,
    ArmSummary,
    PairwiseSummary,
    SrmResult,
    ab_verdict,
    pairwise_scores,
    pairwise_summary,
    srm_check,
    summarize_arm,
)
from stillhouse.eval.cost import CostSummary, Price, Request, arm_costs
from stillhouse.eval.store import EvalStore, StoredJudgment
from stillhouse.eval.window import Window, read_window


@dataclass(frozen=True)
class AbSummary:
    window: str
    arms: dict[str, ArmSummary]
    pairwise: dict[str, PairwiseSummary]  # each arm's served answers vs the teacher's
    srm: SrmResult | None
    expected_challenger_share: float | None
    units: dict[str, int]  # users (or requests without a user) per arm, as the SRM counts them
    judge_verdict: AbVerdict  # challenger vs champion, single-answer judge score
    pairwise_verdict: AbVerdict  # challenger vs champion, pairwise score against the teacher
    cost: CostSummary
    judge_model: str | None
    notes: tuple[str, ...] = ()


def share_at(ts: float, changes: Sequence[AbChange], default: float) -> float:
    """The challenger share in force at `ts`: the last change at or before it; before the first
    change, what that change replaced; with no history, `default`."""
    share = changes[0].previous_share if changes else default
    for change in changes:
        if change.ts > ts:
            break
        share = change.share
    return share


def fell_back(record: TrafficRecord) -> bool:
    """The teacher answered instead of the student, or (a mirrored challenger answer, which
    nothing replaces) would have: its `fallback_reason` says so. A request whose teacher failed
    as well (served_by "none", `fallback_reason` set) is an error, not a fallback."""
    if record.served_by == MIRROR:
        return record.fallback_reason is not None
    return record.served_by == Role.TEACHER


def failed(record: TrafficRecord) -> bool:
    """The user got an error, or would have: a mirrored call that failed where the gateway
    would have fallen back to the teacher counts as a fallback, not an error."""
    rescued = record.served_by == MIRROR and record.fallback_reason is not None
    return record.status >= 400 and not rescued


def srm_units(
    records: Sequence[TrafficRecord], changes: Sequence[AbChange], default_share: float
) -> tuple[dict[str, int], float]:
    """Assignment units per arm and the expected challenger share across them.

    The unit is the user (the gateway hashes the user key, so a user's requests are not
    independent draws); a request without a user key is its own unit. A user's arm and expected
    share are taken at their last request: a ramp only ever moves users onto the challenger, so
    the last assignment is the one the current share explains. Mirrored challenger answers
    (served_by "mirror") are left out: their users were assigned to the champion.
    """
    last: dict[str, TrafficRecord] = {}
    for record in records:
        if record.arm not in STUDENT_ROLES or record.served_by == MIRROR:
            continue
        unit = record.user_hash or f"request:{record.request_id}"
        if unit not in last or record.ts >= last[unit].ts:
            last[unit] = record
    counts = dict.fromkeys(STUDENT_ROLES, 0)
    expected = 0.0
    for record in last.values():
        counts[record.arm] += 1
        expected += share_at(record.ts, changes, default_share)
    total = sum(counts.values())
    return counts, (expected / total if total else default_share)


def _judged(judgments: Sequence[StoredJudgment], kind: str, arm: str) -> list[StoredJudgment]:
    return [j for j in judgments if j.kind == kind and j.arm == arm and j.status == "ok"]


def build_ab_summary(
    records: Sequence[TrafficRecord],
    judgments: Sequence[StoredJudgment],
    changes: Sequence[AbChange],
    settings: Settings,
    window_label: str,
) -> AbSummary:
    ev = settings.evaluation
    config = AbConfig(
        alpha=ev.ab.alpha,
        power=ev.ab.power,
        tau=ev.ab.effect_of_interest,
        min_samples=ev.ab.min_samples,
    )
    notes: list[str] = []
    answered = [r for r in records if r.arm in STUDENT_ROLES]
    arms, pairwise, scores, pair_scores = _per_arm(answered, judgments, config)
    units, share = srm_units(answered, changes, settings.gateway.ab.challenger_share)
    srm = None
    if sum(units.values()) > 0:
        expected = {Role.CHAMPION: 1 - share, Role.CHALLENGER: share}
        srm = srm_check(units, expected, alpha=ev.ab.srm_alpha)
    else:
        notes.append("no champion/challenger traffic in the window: no sample-ratio check")
    judge_verdict = ab_verdict(scores[Role.CHALLENGER], scores[Role.CHAMPION], config)
    pairwise_verdict = ab_verdict(
        pairwise_scores(pair_scores[Role.CHALLENGER]),
        pairwise_scores(pair_scores[Role.CHAMPION]),
        config,
    )
    if not judgments:
        notes.append("no judgments in the window: run `stillhouse judge` first")
    judge_models = sorted({j.judge_model for j in judgments})
    return AbSummary(
        window=window_label,
        arms=arms,
        pairwise=pairwise,
        srm=srm,
        expected_challenger_share=share if srm is not None else None,
        units=units,
        judge_verdict=judge_verdict,
        pairwise_verdict=pairwise_verdict,
        cost=_cost(answered, settings, notes),
        judge_model=", ".join(judge_models) or None,
        notes=tuple(notes),
    )


def _per_arm(
    answered: Sequence[TrafficRecord], judgments: Sequence[StoredJudgment], config: AbConfig
) -> tuple[
    dict[str, ArmSummary], dict[str, PairwiseSummary], dict[str, list[float]], dict[str, list[str]]
]:
    """Each arm's summary and pairwise summary, with the judge scores they rest on."""
    arms: dict[str, ArmSummary] = {}
    pairwise: dict[str, PairwiseSummary] = {}
    scores: dict[str, list[float]] = {}
    pair_scores: dict[str, list[str]] = {}
    for arm in STUDENT_ROLES:
        rows = [r for r in answered if r.arm == arm]
        scores[arm] = [float(j.score) for j in _judged(judgments, "single", arm) if j.score]
        pair_scores[arm] = [
            j.outcome for j in _judged(judgments, "pairwise", arm) if j.outcome is not None
        ]
        arms[arm] = summarize_arm(
            arm,
            scores[arm],
            [fell_back(r) for r in rows],
            [r.latency_s for r in rows],
            [failed(r) for r in rows],
            confidence=1 - config.alpha,
        )
        pairwise[arm] = pairwise_summary(
            pair_scores[arm], confidence=1 - config.alpha, alpha=config.alpha
        )
    return arms, pairwise, scores, pair_scores


def _cost(answered: Sequence[TrafficRecord], settings: Settings, notes: list[str]) -> CostSummary:
    """What each arm's own users cost; mirrored answers served no user, so they are left out."""
    prices = {role: Price(**p.model_dump()) for role, p in settings.evaluation.prices.items()}
    paid = [r for r in answered if r.served_by != MIRROR]
    if len(paid) < len(answered):
        notes.append(
            f"{len(answered) - len(paid)} mirrored challenger answers (mirror phase, no user saw "
            "them) are judged and counted in fallback and latency, but left out of the cost "
            "and the sample-ratio check"
        )
    requests = [
        Request(
            r.arm, r.served_by, r.prompt_tokens, r.completion_tokens, r.student_completion_tokens
        )
        for r in paid
    ]
    return arm_costs(requests, prices)


def ab_summary_for_window(
    settings: Settings, window: Window
) -> tuple[AbSummary, list[TrafficRecord], list[StoredJudgment]]:
    """The A/B summary of `window`, with the records and judgments it was built from."""
    records = read_window(settings.traffic_log_path, window)
    with TrafficLogReader(settings.traffic_log_path) as log:
        changes = log.ab_changes()
    with EvalStore(settings.eval_db_path) as store:
        judgments = store.judgments(
            since=window.since, until=window.until, judge_model=settings.evaluation.judge.model
        )
    summary = build_ab_summary(records, judgments, changes, settings, window.label)
    return summary, records, judgments


def verdict_row(label: str, verdict: AbVerdict) -> Mapping[str, object]:
    d, s = verdict.difference, verdict.sequential
    return {
        "metric": label,
        "verdict": verdict.verdict,
        "challenger_mean": None if d is None else d.mean_treatment,
        "champion_mean": None if d is None else d.mean_control,
        "difference": None if d is None else d.diff,
        "ci_low": None if d is None else d.low,
        "ci_high": None if d is None else d.high,
        "always_valid_low": None if s is None else s.low,
        "always_valid_high": None if s is None else s.high,
        "p_value_always_valid": None if s is None else s.p_value,
        "mde": verdict.mde,
        "reason": verdict.reason,
    }


def ab_metrics(report: AbSummary) -> dict[str, float]:
    """Flat numbers for MLflow (NaN dropped by the tracker)."""
    out: dict[str, float] = {}
    for arm in STUDENT_ROLES:
        s, p = report.arms[arm], report.pairwise[arm]
        out.update(
            {
                f"{arm}.requests": s.n,
                f"{arm}.judge_n": s.judge_n,
                f"{arm}.judge_mean": s.judge_mean,
                f"{arm}.fallback_rate": s.fallback_rate,
                f"{arm}.latency_p99_s": s.latency_p99,
                f"{arm}.pairwise_win_or_tie": p.win_or_tie_rate,
                f"{arm}.pairwise_score": p.score,
            }
        )
        cost = report.cost.arms.get(arm)
        if cost is not None:
            out[f"{arm}.cost_per_request"] = cost.per_request
            out[f"{arm}.savings_fraction"] = cost.savings_fraction
    if report.srm is not None:
        out["srm.p_value"] = report.srm.p_value
        out["srm.alarm"] = float(report.srm.alarm)
    for key, v in (("judge", report.judge_verdict), ("pairwise", report.pairwise_verdict)):
        out[f"verdict.{key}"] = {"better": 1.0, "worse": -1.0}.get(v.verdict, 0.0)
        if v.difference is not None:
            out[f"diff.{key}"] = v.difference.diff
        if v.mde is not None:
            out[f"mde.{key}"] = v.mde
    return out
