"""`stillhouse ab`: the A/B test's state over a window of the traffic log.

    stillhouse ab                      # the default window (evaluation.window_hours)
    stillhouse ab --since 2h

Per arm: judge scores, pairwise results against the teacher, fallback rate, latency and cost
(with the savings against sending everything to the teacher). Across arms: the sample-ratio
check against the share that was in force (from the log's A/B history), and challenger vs
champion on the judge score with a fixed-n interval, an always-valid sequential interval, the
minimum detectable effect at this sample size and a verdict. Reading and deciding only: the
numbers come from `stillhouse.eval.abtest` and `stillhouse.eval.cost`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.table import Table

from stillhouse.common.config import Settings
from stillhouse.common.formatting import number
from stillhouse.common.traffic import MIRROR, AbChange, TrafficRecord
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
from stillhouse.eval.cost import CostReport, Price, Request, arm_costs
from stillhouse.eval.store import StoredJudgment

ARMS = ("champion", "challenger")


@dataclass(frozen=True)
class AbReport:
    window: str
    arms: dict[str, ArmSummary]
    pairwise: dict[str, PairwiseSummary]  # each arm's served answers vs the teacher's
    srm: SrmResult | None
    expected_challenger_share: float | None
    units: dict[str, int]  # users (or requests without a user) per arm, as the SRM counts them
    judge_verdict: AbVerdict  # challenger vs champion, single-answer judge score
    pairwise_verdict: AbVerdict  # challenger vs champion, pairwise score against the teacher
    cost: CostReport
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
    return record.served_by == "teacher"


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
        if record.arm not in ARMS or record.served_by == MIRROR:
            continue
        unit = record.user_hash or f"request:{record.request_id}"
        if unit not in last or record.ts >= last[unit].ts:
            last[unit] = record
    counts = dict.fromkeys(ARMS, 0)
    expected = 0.0
    for record in last.values():
        counts[record.arm] += 1
        expected += share_at(record.ts, changes, default_share)
    total = sum(counts.values())
    return counts, (expected / total if total else default_share)


def _judged(judgments: Sequence[StoredJudgment], kind: str, arm: str) -> list[StoredJudgment]:
    return [j for j in judgments if j.kind == kind and j.arm == arm and j.status == "ok"]


def build_ab_report(
    records: Sequence[TrafficRecord],
    judgments: Sequence[StoredJudgment],
    changes: Sequence[AbChange],
    settings: Settings,
    window_label: str,
) -> AbReport:
    ev = settings.evaluation
    config = AbConfig(
        alpha=ev.ab.alpha,
        power=ev.ab.power,
        tau=ev.ab.effect_of_interest,
        min_samples=ev.ab.min_samples,
    )
    notes: list[str] = []
    answered = [r for r in records if r.arm in ARMS]
    arms: dict[str, ArmSummary] = {}
    pairwise: dict[str, PairwiseSummary] = {}
    scores: dict[str, list[float]] = {}
    pair_scores: dict[str, list[str]] = {}
    for arm in ARMS:
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
    units, share = srm_units(answered, changes, settings.gateway.ab.challenger_share)
    srm = None
    if sum(units.values()) > 0:
        srm = srm_check(units, {"champion": 1 - share, "challenger": share}, alpha=ev.ab.srm_alpha)
    else:
        notes.append("no champion/challenger traffic in the window: no sample-ratio check")
    judge_verdict = ab_verdict(scores["challenger"], scores["champion"], config)
    pairwise_verdict = ab_verdict(
        pairwise_scores(pair_scores["challenger"]),
        pairwise_scores(pair_scores["champion"]),
        config,
    )
    if not judgments:
        notes.append("no judgments in the window: run `stillhouse judge` first")
    prices = {role: Price(**p.model_dump()) for role, p in ev.prices.items()}
    # Mirrored answers served no user: the challenger's cost is what its own users cost.
    paid = [r for r in answered if r.served_by != MIRROR]
    if len(paid) < len(answered):
        notes.append(
            f"{len(answered) - len(paid)} mirrored challenger answers (shadow, no user saw "
            "them) are judged and counted in fallback and latency, but left out of the cost "
            "and the sample-ratio check"
        )
    cost = arm_costs(
        [
            Request(
                r.arm,
                r.served_by,
                r.prompt_tokens,
                r.completion_tokens,
                r.student_completion_tokens,
            )
            for r in paid
        ],
        prices,
    )
    judge_models = sorted({j.judge_model for j in judgments})
    return AbReport(
        window=window_label,
        arms=arms,
        pairwise=pairwise,
        srm=srm,
        expected_challenger_share=share if srm is not None else None,
        units=units,
        judge_verdict=judge_verdict,
        pairwise_verdict=pairwise_verdict,
        cost=cost,
        judge_model=", ".join(judge_models) or None,
        notes=tuple(notes),
    )


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


def ab_tables(report: AbReport) -> list[Table]:
    """The per-arm table and the challenger-vs-champion table, for the terminal."""
    arms = Table(title=f"A/B per arm: quality ({report.window})")
    for col in ("arm", "requests", "users", "judge ± CI (n)", "vs teacher W/T/L", "fallback"):
        arms.add_column(col, justify="left" if col == "arm" else "right")
    ops = Table(title="A/B per arm: latency and cost")
    for col in ("arm", "p50 s", "p99 s", "cost/request", "saved vs teacher"):
        ops.add_column(col, justify="left" if col == "arm" else "right")
    for arm in ARMS:
        s, p, c = report.arms[arm], report.pairwise[arm], report.cost.arms.get(arm)
        judge = "–"
        if s.judge_n:
            half = (s.judge_ci[1] - s.judge_ci[0]) / 2 if s.judge_n >= 2 else math.nan
            judge = f"{s.judge_mean:.2f} ± {number(half, '.2f')} ({s.judge_n})"
        arms.add_row(
            arm, str(s.n), str(report.units.get(arm, 0)), judge,
            f"{p.wins}/{p.ties}/{p.losses}" if p.n else "–", number(s.fallback_rate, ".1%"),
        )  # fmt: skip
        ops.add_row(
            arm, number(s.latency_p50, ".2f"), number(s.latency_p99, ".2f"),
            number(c.per_request if c else None, ".5f"),
            number(c.savings_fraction if c else None, ".0%"),
        )  # fmt: skip
    verdicts = Table(title="challenger vs champion")
    for col in ("metric", "diff [95% CI]", "always-valid", "MDE", "verdict"):
        verdicts.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for label, v in (("judge", report.judge_verdict),
                     ("vs teacher", report.pairwise_verdict)):  # fmt: skip
        d, s = v.difference, v.sequential
        verdicts.add_row(
            label,
            "–" if d is None else f"{d.diff:+.2f} [{d.low:+.2f}, {d.high:+.2f}]",
            "–" if s is None else f"[{s.low:+.2f}, {s.high:+.2f}]",
            number(v.mde),
            v.verdict,
        )
    return [arms, ops, verdicts]


def srm_line(report: AbReport) -> str:
    if report.srm is None:
        return "sample ratio: no traffic to check"
    srm, share = report.srm, report.expected_challenger_share or 0.0
    state = "MISMATCH (alarm)" if srm.alarm else "ok"
    return (
        f"sample ratio {state}: {srm.observed['challenger']} challenger / "
        f"{srm.observed['champion']} champion users against an expected share of {share:.1%} "
        f"(chi² {srm.chi2:.2f}, p = {srm.p_value:.3g})"
    )


def ab_metrics(report: AbReport) -> dict[str, float]:
    """Flat numbers for MLflow (NaN dropped by the tracker)."""
    out: dict[str, float] = {}
    for arm in ARMS:
        s, p = report.arms[arm], report.pairwise[arm]
        out.update({
            f"{arm}.requests": s.n, f"{arm}.judge_n": s.judge_n, f"{arm}.judge_mean": s.judge_mean,
            f"{arm}.fallback_rate": s.fallback_rate, f"{arm}.latency_p99_s": s.latency_p99,
            f"{arm}.pairwise_win_or_tie": p.win_or_tie_rate, f"{arm}.pairwise_score": p.score,
        })  # fmt: skip
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
