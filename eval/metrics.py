"""Evaluation results as Prometheus gauges, one text file per job under `<state_dir>/metrics/`.

The evaluation commands are batch jobs, so they do what batch jobs do for Prometheus: write
the text exposition format atomically (the node exporter's textfile collector, or any static
file server, serves it). Labels are bounded: `arm` (champion / challenger), `estimator`,
`metric` — never a model version, user or prompt.

    stillhouse_drift_state{arm="challenger"} 2      # 0 ok, 1 warn, 2 drift, -1 collecting
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from stillhouse.common.roles import STUDENT_ROLES
from stillhouse.eval.ab_summary import AbSummary
from stillhouse.eval.student_drift import STATE_VALUE, StudentDrift

VERDICT_VALUE = {"better": 1.0, "inconclusive": 0.0, "worse": -1.0}


def _set(gauge: Gauge, value: float | None, **labels: str) -> None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return  # no sample beats a fake zero
    (gauge.labels(**labels) if labels else gauge).set(value)


def _finish(registry: CollectorRegistry, job: str, path: Path) -> Path:
    stamp = Gauge(
        "stillhouse_eval_last_run_timestamp_seconds",
        "When this evaluation job last finished.",
        ["job"],
        registry=registry,
    )
    stamp.labels(job=job).set(time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path


def write_drift_metrics(results: Sequence[StudentDrift], path: Path) -> Path:
    r = CollectorRegistry()
    state = Gauge(
        "stillhouse_drift_state",
        "0 ok, 1 warn, 2 drift, -1 collecting a reference.",
        ["arm"],
        registry=r,
    )
    kl = Gauge(
        "stillhouse_divergence_kl",
        "Mean per-token KL(student || teacher) estimate over the window's shadow records.",
        ["arm", "estimator"],
        registry=r,
    )
    top1 = Gauge(
        "stillhouse_divergence_top1_agreement",
        "Share of answer tokens where student and teacher agree on the top-1 token.",
        ["arm"],
        registry=r,
    )
    cusum = Gauge(
        "stillhouse_drift_cusum_statistic",
        "Largest CUSUM value over the window.",
        ["arm"],
        registry=r,
    )
    threshold = Gauge(
        "stillhouse_drift_cusum_threshold",
        "The CUSUM alarm threshold calibrated on the reference.",
        ["arm"],
        registry=r,
    )
    psi = Gauge(
        "stillhouse_drift_psi",
        "Population stability index, window vs reference.",
        ["arm"],
        registry=r,
    )
    records = Gauge(
        "stillhouse_drift_window_records", "Shadow records in the window.", ["arm"], registry=r
    )
    for result in results:
        if result.arm not in STUDENT_ROLES:
            continue
        arm = result.arm
        state.labels(arm=arm).set(STATE_VALUE.get(result.state, -1))
        d, rep = result.divergence, result.assessment
        _set(records, d.n if d else 0, arm=arm)
        if d is not None:
            _set(kl, d.k3_mean, arm=arm, estimator="k3")
            _set(kl, d.k1_mean, arm=arm, estimator="k1")
            _set(top1, d.top1_agreement, arm=arm)
        if rep is not None:
            _set(cusum, rep.sequential_statistic, arm=arm)
            _set(threshold, rep.sequential_threshold, arm=arm)
            _set(psi, rep.tests.psi if rep.tests else None, arm=arm)
    return _finish(r, "drift", path)


def write_ab_metrics(report: AbSummary, path: Path) -> Path:
    r = CollectorRegistry()
    judge = Gauge(
        "stillhouse_judge_score_mean",
        "Mean LLM-judge score (1-5) of served answers.",
        ["arm"],
        registry=r,
    )
    win = Gauge(
        "stillhouse_judge_pairwise_win_or_tie_rate",
        "Share of served answers the judge rates at least as good as the teacher's.",
        ["arm"],
        registry=r,
    )
    fallback = Gauge(
        "stillhouse_ab_fallback_rate",
        "Share of the arm's requests the teacher answered.",
        ["arm"],
        registry=r,
    )
    cost = Gauge(
        "stillhouse_ab_cost_per_request",
        "Mean cost per request at configured prices.",
        ["arm"],
        registry=r,
    )
    savings = Gauge(
        "stillhouse_ab_savings_fraction",
        "Cost saved against sending the same requests to the teacher.",
        ["arm"],
        registry=r,
    )
    verdict = Gauge(
        "stillhouse_ab_verdict",
        "Challenger vs champion: 1 better, 0 inconclusive, -1 worse.",
        ["metric"],
        registry=r,
    )
    srm = Gauge(
        "stillhouse_ab_srm_alarm", "1 when the sample ratio mismatches the share.", registry=r
    )
    srm_p = Gauge("stillhouse_ab_srm_p_value", "The sample-ratio check's p-value.", registry=r)
    share = Gauge(
        "stillhouse_ab_expected_challenger_share",
        "The share in force over the window, as the log's A/B history says.",
        registry=r,
    )
    for arm in STUDENT_ROLES:
        s = report.arms[arm]
        _set(judge, s.judge_mean, arm=arm)
        _set(fallback, s.fallback_rate, arm=arm)
        _set(win, report.pairwise[arm].win_or_tie_rate, arm=arm)
        c = report.cost.arms.get(arm)
        if c is not None:
            _set(cost, c.per_request, arm=arm)
            _set(savings, c.savings_fraction, arm=arm)
    verdict.labels(metric="judge_score").set(VERDICT_VALUE[report.judge_verdict.verdict])
    verdict.labels(metric="pairwise").set(VERDICT_VALUE[report.pairwise_verdict.verdict])
    if report.srm is not None:
        srm.set(float(report.srm.alarm))
        srm_p.set(report.srm.p_value)
    _set(share, report.expected_challenger_share)
    return _finish(r, "ab", path)
