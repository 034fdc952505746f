"""The evaluation commands' terminal tables: plain results in, rich tables and lines out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich.table import Table

from stillhouse.common.formatting import number
from stillhouse.common.roles import STUDENT_ROLES
from stillhouse.eval.ab_summary import AbSummary
from stillhouse.eval.judging import JudgingResult, judge_summary_rows
from stillhouse.eval.student_drift import StudentDrift


def rows_table(title: str, rows: Sequence[Mapping[str, object]]) -> Table:
    """A table with one column per key of the first row."""
    table = Table(title=title)
    if not rows:
        return table
    for key in rows[0]:
        table.add_column(str(key), justify="left" if key == "arm" else "right")
    for row in rows:
        table.add_row(*(number(v) for v in row.values()))
    return table


def judge_lines(result: JudgingResult) -> list[str]:
    """What a judging run cost, and how the judge agreed with ground truth where it is known."""
    s = result.stats
    failed = result.references_failed
    lines = [
        f"judge calls {s.calls} ({s.cache_hits} verdicts from cache), tokens "
        f"{s.prompt_tokens} prompt / {s.completion_tokens} completion; unparseable "
        f"{s.unparseable}, errors {s.errors}, parse retries {s.parse_retries}"
        + (f"; {failed} teacher references failed" if failed else "")
    ]
    a = result.agreement
    if a.single_n or a.pairwise_n:
        parts = []
        if a.single_exact is not None:
            parts.append(f"score exact {a.single_exact:.0%} of {a.single_n}")
        if a.single_correct is not None:
            parts.append(f"'fully correct' {a.single_correct:.0%}")
        if a.non_tie is not None:
            parts.append(f"pairwise (non-tie) {a.non_tie:.0%} of {a.non_tie_n}")
        if a.pairwise_with_ties is not None:
            parts.append(f"pairwise (ties included) {a.pairwise_with_ties:.0%} of {a.pairwise_n}")
        lines.append("judge vs ground truth: " + ", ".join(parts))
    return lines


def judge_table(result: JudgingResult) -> Table:
    return rows_table(f"judge: {result.judge_model}", judge_summary_rows(result))


def ab_tables(summary: AbSummary) -> list[Table]:
    """The per-arm table and the challenger-vs-champion table, for the terminal."""
    arms = Table(title=f"A/B per arm: quality ({summary.window})")
    for col in ("arm", "requests", "users", "judge ± CI (n)", "vs teacher W/T/L", "fallback"):
        arms.add_column(col, justify="left" if col == "arm" else "right")
    ops = Table(title="A/B per arm: latency and cost")
    for col in ("arm", "p50 s", "p99 s", "cost/request", "saved vs teacher"):
        ops.add_column(col, justify="left" if col == "arm" else "right")
    for arm in STUDENT_ROLES:
        s, p, c = summary.arms[arm], summary.pairwise[arm], summary.cost.arms.get(arm)
        judge = "–"
        if s.judge_n:
            half = (s.judge_ci[1] - s.judge_ci[0]) / 2 if s.judge_n >= 2 else math.nan
            judge = f"{s.judge_mean:.2f} ± {number(half, '.2f')} ({s.judge_n})"
        arms.add_row(
            arm,
            str(s.n),
            str(summary.units.get(arm, 0)),
            judge,
            f"{p.wins}/{p.ties}/{p.losses}" if p.n else "–",
            number(s.fallback_rate, ".1%"),
        )
        ops.add_row(
            arm,
            number(s.latency_p50, ".2f"),
            number(s.latency_p99, ".2f"),
            number(c.per_request if c else None, ".5f"),
            number(c.savings_fraction if c else None, ".0%"),
        )
    verdicts = Table(title="challenger vs champion")
    for col in ("metric", "diff [95% CI]", "always-valid", "MDE", "verdict"):
        verdicts.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for label, v in (("judge", summary.judge_verdict), ("vs teacher", summary.pairwise_verdict)):
        d, s = v.difference, v.sequential
        verdicts.add_row(
            label,
            "–" if d is None else f"{d.diff:+.2f} [{d.low:+.2f}, {d.high:+.2f}]",
            "–" if s is None else f"[{s.low:+.2f}, {s.high:+.2f}]",
            number(v.mde),
            v.verdict,
        )
    return [arms, ops, verdicts]


def srm_line(summary: AbSummary) -> str:
    if summary.srm is None:
        return "sample ratio: no traffic to check"
    srm, share = summary.srm, summary.expected_challenger_share or 0.0
    state = "MISMATCH (alarm)" if srm.alarm else "ok"
    return (
        f"sample ratio {state}: {srm.observed['challenger']} challenger / "
        f"{srm.observed['champion']} champion users against an expected share of {share:.1%} "
        f"(chi² {srm.chi2:.2f}, p = {srm.p_value:.3g})"
    )


def drift_table(results: Sequence[StudentDrift], window: str) -> Table:
    """The terminal view: the full rows (every test's numbers) go to MLflow."""
    table = Table(title=f"divergence and drift ({window})")
    for col in ("arm", "records", "KL k3 [95% CI]", "top-1", "PSI", "test p", "CUSUM/h", "state"):
        table.add_column(col, justify="left" if col in ("arm", "state") else "right")
    for r in results:
        d, rep = r.divergence, r.assessment
        tests = rep.tests if rep else None
        cusum = "–"
        if rep and rep.sequential_statistic is not None and rep.sequential_threshold:
            cusum = f"{rep.sequential_statistic:.1f}/{rep.sequential_threshold:.1f}"
        table.add_row(
            r.arm,
            str(d.n if d else 0),
            f"{d.k3_mean:.3f} [{d.k3_ci[0]:.3f}, {d.k3_ci[1]:.3f}]" if d else "–",
            number(d.top1_agreement) if d else "–",
            number(tests.psi) if tests else "–",
            f"{tests.pvalue:.2g}" if tests else "–",
            cusum,
            r.state,
        )
    return table
