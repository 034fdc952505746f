"""Promotion gates: pure functions that turn evaluation results into pass / fail / inconclusive.

    ev = evidence_from(ab, drift)            # plain numbers from the A/B and drift results
    gates = evaluate_gates(ev, settings.rollout.gates, phase="ramp")     # or "mirror"
    gates.status, gates.summary_line(), gates.as_metrics()

Six gates (not_worse, win_or_tie, divergence, fallback, latency, srm), each returning its status
with the numbers it decided on; a look fails if any gate fails, else is inconclusive if any is.
"Fail" needs the data to say the challenger is surely past the limit, so noise alone rolls
nothing back. Each gate's rule, and why, is in docs/rollout.md (Gates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

from stillhouse.common.formatting import finite_or_none
from stillhouse.common.roles import STUDENT_ROLES, Role
from stillhouse.common.rollout_settings import GateSettings
from stillhouse.eval.ab_summary import AbSummary
from stillhouse.eval.abtest import msprt_from_estimate, wilson_interval
from stillhouse.eval.student_drift import StudentDrift
from stillhouse.rollout.gate_status import STATUS_VALUE, GateStatus, combined_status

# The controller phases that have gates: mirrored answers only, or a ramp step serving users.
GatePhase = Literal["mirror", "ramp"]
GATE_PHASES: tuple[GatePhase, ...] = ("mirror", "ramp")
Interval = tuple[float, float]

# Below this many requests a p99 is essentially the slowest request or two: too noisy to fail on.
P99_MIN_REQUESTS = 100
# pairwise_summary's own mixing scale (score units), for the no-champion not-worse test when
# the A/B results carry no tau.
DEFAULT_PAIRWISE_TAU = 0.1
FMT = "{:.3f}"  # divergence and fallback numbers in details


@dataclass(frozen=True)
class GateResult:
    """One gate's decision at one look, with the numbers it decided on."""

    name: str
    status: GateStatus
    observed: float | None
    limit: float | None
    n: int  # the challenger's samples behind the decision
    detail: str
    interval: Interval | None = None  # the interval the decision used, where there is one


@dataclass(frozen=True)
class ArmEvidence:
    """One arm's numbers. None / 0: no data."""

    requests: int = 0
    fallback_rate: float | None = None
    fallback_ci: Interval | None = None  # as the A/B results computed it (informational)
    latency_p99: float | None = None
    pairwise_n: int = 0  # judged against the teacher
    win_or_tie_rate: float | None = None
    win_or_tie_ci: Interval | None = None  # as the A/B results computed it (informational)
    pairwise_score: float | None = None  # mean of +1 / 0 / −1
    divergence_n: int = 0
    divergence_k3: float | None = None
    divergence_ci: Interval | None = None


@dataclass(frozen=True)
class GateEvidence:
    """What every gate looks at: both arms' numbers, the A/B difference, the sample-ratio check."""

    champion: ArmEvidence = field(default_factory=ArmEvidence)
    challenger: ArmEvidence = field(default_factory=ArmEvidence)
    # challenger − champion pairwise score vs the teacher; se and tau let the gate recompute the
    # always-valid interval at the gates' alpha; `pairwise_interval` is the A/B results' own.
    pairwise_diff: float | None = None
    pairwise_diff_se: float | None = None
    pairwise_interval: Interval | None = None
    pairwise_tau: float | None = None
    srm_p_value: float | None = None
    srm_ok: bool | None = None
    srm_units: int = 0
    notes: tuple[str, ...] = ()


def _pair(ci: tuple[float, float] | None) -> Interval | None:
    if ci is None or not all(math.isfinite(v) for v in ci):
        return None
    return (float(ci[0]), float(ci[1]))


def _pick_drift(drift: Sequence[StudentDrift], arm: str) -> tuple[StudentDrift | None, str]:
    # A window can span a model change, leaving two students on one arm: the one with the most
    # records in the window is the one the arm mostly served.
    mine = [d for d in drift if d.arm == arm and d.divergence is not None]
    if not mine:
        return None, ""
    best = max(mine, key=lambda d: d.divergence.n if d.divergence else 0)
    note = ""
    if len(mine) > 1:
        note = f"{len(mine)} students on the {arm} arm; used {best.student_model}"
    return best, note


def evidence_from(ab: AbSummary, drift: Sequence[StudentDrift]) -> GateEvidence:
    """The numbers the gates need, from the A/B results and the per-student drift results."""
    arms: dict[str, ArmEvidence] = {}
    notes: list[str] = []
    for arm in STUDENT_ROLES:
        s, p = ab.arms[arm], ab.pairwise[arm]
        d, note = _pick_drift(drift, arm)
        if note:
            notes.append(note)
        div = d.divergence if d is not None else None
        arms[arm] = ArmEvidence(
            requests=s.n,
            fallback_rate=finite_or_none(s.fallback_rate),
            fallback_ci=_pair(s.fallback_ci) if s.n else None,
            latency_p99=finite_or_none(s.latency_p99),
            pairwise_n=p.n,
            win_or_tie_rate=finite_or_none(p.win_or_tie_rate),
            win_or_tie_ci=_pair(p.win_or_tie_ci) if p.n else None,
            pairwise_score=finite_or_none(p.score),
            divergence_n=div.n if div else 0,
            divergence_k3=finite_or_none(div.k3_mean) if div else None,
            divergence_ci=_pair(div.k3_ci) if div else None,
        )
    v = ab.pairwise_verdict
    diff, seq = v.difference, v.sequential
    tau = seq.tau if seq is not None else None
    own = ab.pairwise[Role.CHALLENGER].sequential
    if tau is None and own is not None:
        tau = own.tau
    srm = ab.srm
    return GateEvidence(
        champion=arms[Role.CHAMPION],
        challenger=arms[Role.CHALLENGER],
        pairwise_diff=diff.diff if diff else None,
        pairwise_diff_se=diff.se if diff else None,
        pairwise_interval=(seq.low, seq.high) if seq else None,
        pairwise_tau=tau,
        srm_p_value=srm.p_value if srm else None,
        srm_ok=(not srm.alarm) if srm else None,
        srm_units=sum(ab.units.values()) if srm else 0,
        notes=tuple(notes),
    )


# ---- helpers -------------------------------------------------------------------------------


def _few(
    name: str,
    limit: float | None,
    cfg: GateSettings,
    challenger: tuple[str, int],
    champion: tuple[str, int] | None = None,
) -> GateResult | None:
    """Inconclusive below `min_samples`: the challenger's count, then the champion's (None when
    the gate needs none, or lets the teacher stand in: `_against_teacher`)."""
    for what, n in (challenger, *([champion] if champion else [])):
        if n < cfg.min_samples:
            detail = f"{what}: n={n} < {cfg.min_samples}"
            return GateResult(name, "inconclusive", None, limit, challenger[1], detail)
    return None


def _wilson(rate: float | None, n: int, alpha: float) -> Interval:
    # Recomputed from the count at the gates' alpha, so one setting governs every gate interval.
    k = round((rate or 0.0) * n)
    return wilson_interval(k, n, 1 - alpha)


def _iv(ci: Interval | None, fmt: str = "{:.2f}") -> str:
    return "" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _bounded(
    name: str,
    label: str,
    n: int,
    ch: tuple[float, Interval | None],
    base: tuple[float, Interval | None],
    margin: float,
    base_label: str,
    fmt: str,
) -> GateResult:
    """The shared rule of divergence and fallback: excess ≤ margin passes; the challenger's lower
    bound above the baseline's upper bound + margin fails; anything between is inconclusive."""
    (c, c_ci), (b, b_ci) = ch, base
    excess = c - b
    c_low = c_ci[0] if c_ci else c
    b_high = b_ci[1] if b_ci else b
    numbers = (
        f"challenger {label} {fmt.format(c)}{_iv(c_ci, fmt)} on {n} vs {base_label} "
        f"{fmt.format(b)}{_iv(b_ci, fmt)}: excess {excess:+.3f}"
    )
    if excess <= margin:
        status: GateStatus = "pass"
        verdict = f"≤ margin {margin:.3f}"
    elif c_low > b_high + margin:
        status, verdict = "fail", f"surely > margin {margin:.3f}"
    else:
        status, verdict = "inconclusive", f"> margin {margin:.3f}, intervals overlap"
    interval = (c_low - b_high, (c_ci[1] if c_ci else c) - (b_ci[0] if b_ci else b))
    return GateResult(name, status, excess, margin, n, f"{numbers} {verdict}", interval)


def _against_teacher(
    bounded: Callable[..., GateResult], champion: tuple[str, int], cfg: GateSettings
) -> GateResult:
    """The teacher stands in for a champion with fewer than `min_samples` samples. It bounds
    every champion from below (a KL and a fallback rate are ≥ 0), so a pass against it is a pass
    against any champion. A fail counts only when the champion has no samples at all: with a
    few, more may come and show the champion just as far, so the gate waits. (An uncertified
    champion at a strict threshold falls back on almost everything: without this rule its
    handful of records held every challenger inconclusive until the time limit.)"""
    what, n = champion
    label = f"the teacher (no {what})" if n == 0 else f"the teacher ({what}: n={n})"
    result = bounded((0.0, (0.0, 0.0)), base_label=label)
    if n == 0 or result.status == "pass":
        return result
    wait = f"; not decided until {what} reach {cfg.min_samples} (n={n})"
    return replace(result, status="inconclusive", detail=result.detail + wait)


# ---- the gates -----------------------------------------------------------------------------


def _challenger_score_interval(ev: GateEvidence, alpha: float) -> Interval | None:
    """The challenger's own pairwise score vs the teacher, always-valid (one-sample mSPRT); the
    variance follows from the win / tie / loss shares."""
    c = ev.challenger
    if c.pairwise_score is None or c.win_or_tie_rate is None or c.pairwise_n < 2:
        return None
    n, s = c.pairwise_n, c.pairwise_score
    loss = 1.0 - c.win_or_tie_rate
    win = s + loss
    var = max(win + loss - s * s, 0.0) * n / (n - 1)
    if var == 0.0:
        return (s, s)
    seq = msprt_from_estimate(s, var / n, ev.pairwise_tau or DEFAULT_PAIRWISE_TAU, alpha)
    return (seq.low, seq.high)


def _diff_interval(ev: GateEvidence, alpha: float) -> Interval | None:
    d, se = ev.pairwise_diff, ev.pairwise_diff_se
    if d is None:
        return None
    if se == 0.0:  # both arms constant: the difference is exact
        return (d, d)
    if se is None or ev.pairwise_tau is None:
        return ev.pairwise_interval
    seq = msprt_from_estimate(d, se * se, ev.pairwise_tau, alpha)
    return (seq.low, seq.high)


def gate_not_worse(ev: GateEvidence, cfg: GateSettings) -> GateResult:
    name, c_n, b_n = "not_worse", ev.challenger.pairwise_n, ev.champion.pairwise_n
    limit = -cfg.noninferiority_margin
    champion = ("champion pairwise judgments", b_n) if b_n else None
    few = _few(name, limit, cfg, ("challenger pairwise judgments", c_n), champion)
    if few is not None:
        return few
    if b_n == 0:
        point, interval = ev.challenger.pairwise_score, _challenger_score_interval(ev, cfg.alpha)
        what = f"challenger pairwise score vs teacher (no champion judgments) on {c_n}"
    else:
        point, interval = ev.pairwise_diff, _diff_interval(ev, cfg.alpha)
        what = f"challenger − champion pairwise score vs teacher on {c_n}/{b_n}"
    if point is None or interval is None:
        return GateResult(name, "inconclusive", point, limit, c_n, f"{what}: no estimate")
    low, high = interval
    numbers = f"{what}: {point:+.3f}, always-valid [{low:+.3f}, {high:+.3f}]"
    if low >= limit:
        status: GateStatus = "pass"
        verdict = f"low ≥ {limit:+.2f}: not worse by more than the margin"
    elif high < limit:
        status, verdict = "fail", f"high < {limit:+.2f}: worse by more than the margin"
    else:
        status, verdict = "inconclusive", f"interval straddles {limit:+.2f}"
    return GateResult(name, status, point, limit, c_n, f"{numbers} {verdict}", interval)


def gate_win_or_tie(ev: GateEvidence, cfg: GateSettings) -> GateResult:
    name, c = "win_or_tie", ev.challenger
    rate, bar = c.win_or_tie_rate or 0.0, cfg.win_or_tie_bar
    few = _few(name, bar, cfg, ("challenger pairwise judgments", c.pairwise_n))
    if few is not None:
        return few
    ci = _wilson(rate, c.pairwise_n, cfg.alpha)
    numbers = f"challenger win-or-tie vs teacher {rate:.2f}{_iv(ci)} on {c.pairwise_n}"
    if rate >= bar:
        status: GateStatus = "pass"
        verdict = f"≥ bar {bar:.2f}"
    elif ci[1] < bar:
        status, verdict = "fail", f"surely < bar {bar:.2f}"
    else:
        status, verdict = "inconclusive", f"< bar {bar:.2f} but the interval reaches it"
    return GateResult(name, status, rate, bar, c.pairwise_n, f"{numbers} {verdict}", ci)


def gate_divergence(ev: GateEvidence, cfg: GateSettings) -> GateResult:
    name, c, b = "divergence", ev.challenger, ev.champion
    few = _few(name, cfg.divergence_margin, cfg, ("challenger shadow records", c.divergence_n))
    if few is not None:
        return few
    ch = (c.divergence_k3 or 0.0, c.divergence_ci)
    bounded = partial(
        _bounded, name, "mean k3 KL", c.divergence_n, ch, margin=cfg.divergence_margin, fmt=FMT
    )
    if b.divergence_n >= cfg.min_samples and b.divergence_k3 is not None:
        return bounded((b.divergence_k3, b.divergence_ci), base_label="champion")
    return _against_teacher(bounded, ("champion shadow records", b.divergence_n), cfg)


def gate_fallback(ev: GateEvidence, cfg: GateSettings) -> GateResult:
    name, c, b = "fallback", ev.challenger, ev.champion
    few = _few(name, cfg.fallback_margin, cfg, ("challenger requests", c.requests))
    if few is not None:
        return few
    ch = (c.fallback_rate or 0.0, _wilson(c.fallback_rate, c.requests, cfg.alpha))
    bounded = partial(
        _bounded, name, "fallback rate", c.requests, ch, margin=cfg.fallback_margin, fmt=FMT
    )
    if b.requests >= cfg.min_samples:
        base = (b.fallback_rate or 0.0, _wilson(b.fallback_rate, b.requests, cfg.alpha))
        return bounded(base, base_label="champion")
    return _against_teacher(bounded, ("champion requests", b.requests), cfg)


def _not_applicable(name: str, n: int, limit: float | None) -> GateResult:
    reason = "the challenger serves no users, its answers are mirrored"
    detail = f"not applicable in the mirror phase ({reason})"
    return GateResult(name, "pass", None, limit, n, detail)


def gate_latency(ev: GateEvidence, cfg: GateSettings, phase: GatePhase = "ramp") -> GateResult:
    name, c, b, limit = "latency", ev.challenger, ev.champion, cfg.latency_p99_ratio
    if phase == "mirror":
        return _not_applicable(name, c.requests, limit)
    # No absolute stands in for a champion's latency: without its requests there is no answer.
    champion = ("champion requests", b.requests)
    few = _few(name, limit, cfg, ("challenger requests", c.requests), champion)
    if few is not None:
        return few
    cp, bp = c.latency_p99, b.latency_p99
    if cp is None or bp is None or bp <= 0.0:
        return GateResult(name, "inconclusive", None, limit, c.requests, "no p99 to compare")
    ratio = cp / bp
    numbers = f"challenger p99 {cp:.3f} s on {c.requests} vs champion {bp:.3f} s: ×{ratio:.2f}"
    if ratio <= limit:
        status: GateStatus = "pass"
        verdict = f"≤ ×{limit:.2f}"
    elif c.requests >= P99_MIN_REQUESTS:
        status, verdict = "fail", f"> ×{limit:.2f}"
    else:
        status = "inconclusive"
        verdict = f"> ×{limit:.2f}, but a p99 needs ≥ {P99_MIN_REQUESTS} requests to fail on"
    return GateResult(name, status, ratio, limit, c.requests, f"{numbers} {verdict}")


def gate_srm(ev: GateEvidence, cfg: GateSettings, phase: GatePhase = "ramp") -> GateResult:
    name, n = "srm", ev.srm_units
    if phase == "mirror":
        return _not_applicable(name, n, None)
    p = ev.srm_p_value
    if ev.srm_ok is None or p is None:
        return GateResult(name, "inconclusive", None, None, 0, "no sample-ratio check possible")
    if not ev.srm_ok:
        detail = f"sample-ratio mismatch: p={p:.3g} on {n} units"
        return GateResult(name, "fail", p, None, n, detail)
    few = _few(name, None, cfg, ("assignment units", n))
    if few is not None:
        return GateResult(name, "inconclusive", p, None, n, f"{few.detail} (p={p:.3g})")
    return GateResult(name, "pass", p, None, n, f"sample ratio ok: p={p:.3g} on {n} units")


# ---- one look at all gates ----------------------------------------------------------------


@dataclass(frozen=True)
class GateEvaluation:
    """Every gate's result at one look, in a fixed order, and the status they combine to."""

    phase: GatePhase
    results: tuple[GateResult, ...]

    @property
    def status(self) -> GateStatus:
        return combined_status(r.status for r in self.results)

    def result(self, name: str) -> GateResult:
        return next(r for r in self.results if r.name == name)

    def as_rows(self) -> list[dict[str, object]]:
        return [
            {
                "gate": r.name,
                "status": r.status,
                "observed": r.observed,
                "limit": r.limit,
                "n": r.n,
                "low": r.interval[0] if r.interval else None,
                "high": r.interval[1] if r.interval else None,
                "detail": r.detail,
            }
            for r in self.results
        ]

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers (status as 1 pass / 0 inconclusive / −1 fail); missing ones left out."""
        out = {"gate.status": STATUS_VALUE[self.status]}
        for r in self.results:
            key = f"gate.{r.name}"
            out[f"{key}.status"] = STATUS_VALUE[r.status]
            out[f"{key}.n"] = float(r.n)
            values = {"observed": r.observed, "limit": r.limit}
            if r.interval is not None:
                values.update(low=r.interval[0], high=r.interval[1])
            for field_name, value in values.items():
                if value is not None and math.isfinite(value):
                    out[f"{key}.{field_name}"] = float(value)
        return out

    def summary_line(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in STATUS_VALUE}
        head = (
            f"gates ({self.phase}): {self.status} — {counts['pass']} pass, "
            f"{counts['inconclusive']} inconclusive, {counts['fail']} fail"
        )
        # Failures first: they decide the step.
        rest = [r for r in self.results if r.status == "fail"]
        rest += [r for r in self.results if r.status == "inconclusive"]
        return head + "".join(f"; {r.name}: {r.detail}" for r in rest)


def evaluate_gates(ev: GateEvidence, cfg: GateSettings, *, phase: GatePhase) -> GateEvaluation:
    if phase not in GATE_PHASES:
        raise ValueError(f"phase must be one of {GATE_PHASES}, got {phase!r}")
    results = (
        gate_not_worse(ev, cfg),
        gate_win_or_tie(ev, cfg),
        gate_divergence(ev, cfg),
        gate_fallback(ev, cfg),
        gate_latency(ev, cfg, phase),
        gate_srm(ev, cfg, phase),
    )
    return GateEvaluation(phase, results)
