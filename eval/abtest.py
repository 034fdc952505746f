"""A/B statistics for challenger vs champion: pure functions over plain numbers. Did the split
happen as configured (sample-ratio mismatch), how big is the difference, is it real (fixed-n
and always-valid mSPRT intervals, valid however often the controller peeks), and what could
we have detected (the minimum detectable effect)?

Differences are challenger − champion; higher is better unless `AbConfig.higher_is_better`
says otherwise. Why a sequential test: docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats

from stillhouse.eval.samples import Values, as_sample

Verdict = Literal["better", "worse", "inconclusive"]
Outcome = Literal["win", "tie", "loss"]
_OUTCOME_SCORE = {"win": 1.0, "tie": 0.0, "loss": -1.0}
_SHARE_TOLERANCE = 1e-6


def _check_open_unit(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


@dataclass(frozen=True, slots=True)
class SrmResult:
    """Chi-square goodness of fit of the observed arm counts against the configured shares."""

    chi2: float
    p_value: float
    alarm: bool
    observed: dict[str, int]
    expected: dict[str, float]


def srm_check(
    counts: Mapping[str, int], expected_shares: Mapping[str, float], alpha: float = 0.001
) -> SrmResult:
    """Sample-ratio mismatch: a split that is off means assignment or logging is broken, and every
    other statistic of the test is then biased (Kohavi et al., "Trustworthy Online Controlled
    Experiments", ch. 21). The threshold is strict (p < 0.001 by convention) because the check runs
    on every look and a false alarm halts the experiment.

    An arm configured at share 0 that received traffic is an alarm outright (chi² = ∞).
    """
    _check_open_unit(alpha, "alpha")
    if set(counts) != set(expected_shares):
        raise ValueError(f"arms differ: {sorted(counts)} counted, {sorted(expected_shares)} shared")
    if len(counts) < 2:
        raise ValueError("srm_check needs at least two arms")
    for arm, count in counts.items():
        if isinstance(count, bool) or int(count) != count or count < 0:
            raise ValueError(f"count for arm {arm!r} must be a non-negative integer, got {count!r}")
    for arm, share in expected_shares.items():
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise ValueError(f"share for arm {arm!r} must be in [0, 1], got {share!r}")
    share_sum = math.fsum(expected_shares.values())
    if abs(share_sum - 1.0) > _SHARE_TOLERANCE:
        raise ValueError(f"expected shares must sum to 1, got {share_sum!r}")

    arms = sorted(counts)
    total = sum(int(counts[arm]) for arm in arms)
    observed = {arm: int(counts[arm]) for arm in arms}
    # Renormalise so that expected counts sum to the observed total exactly (scipy checks that).
    expected = {arm: expected_shares[arm] / share_sum * total for arm in arms}
    if any(expected_shares[arm] == 0.0 and observed[arm] > 0 for arm in arms):
        return SrmResult(math.inf, 0.0, True, observed, expected)
    live = [arm for arm in arms if expected_shares[arm] > 0.0]
    if total == 0 or len(live) < 2:
        return SrmResult(0.0, 1.0, False, observed, expected)
    chi2, p_value = stats.chisquare([observed[a] for a in live], [expected[a] for a in live])
    return SrmResult(float(chi2), float(p_value), bool(p_value < alpha), observed, expected)


@dataclass(frozen=True, slots=True)
class MeanDifference:
    """Welch difference of means, treatment − control, with its (fixed-n) confidence interval."""

    diff: float
    low: float
    high: float
    se: float
    n_treatment: int
    n_control: int
    mean_treatment: float
    mean_control: float


def mean_difference(treatment: Values, control: Values, confidence: float = 0.95) -> MeanDifference:
    """Welch's difference of means with a t interval on Welch–Satterthwaite degrees of freedom.

    Welch, not the pooled t: the arms have very different sizes (a 10 % challenger) and need not
    share a variance, which is exactly where the pooled interval mis-covers. This interval is valid
    for one look at a fixed n only; for repeated looks use `msprt`.
    """
    _check_open_unit(confidence, "confidence")
    t, c = as_sample(treatment, "treatment"), as_sample(control, "control")
    if len(t) < 2 or len(c) < 2:
        raise ValueError(f"need at least 2 observations per arm, got {len(t)} and {len(c)}")
    vt, vc = t.var(ddof=1) / len(t), c.var(ddof=1) / len(c)
    se = math.sqrt(vt + vc)
    diff = float(t.mean() - c.mean())
    if se == 0.0:
        half = 0.0
    else:
        df = (vt + vc) ** 2 / (vt**2 / (len(t) - 1) + vc**2 / (len(c) - 1))
        half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return MeanDifference(
        diff, diff - half, diff + half, se, len(t), len(c), float(t.mean()), float(c.mean())
    )


def minimum_detectable_effect(
    sd_treatment: float,
    sd_control: float,
    n_treatment: int,
    n_control: int,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """The smallest true difference a two-sided fixed-n z-test at `alpha` detects with `power`:
    (z_{1−α/2} + z_power) · sqrt(σt²/nt + σc²/nc). It shrinks as 1/sqrt(n): four times the traffic
    halves it. Reported with an inconclusive verdict so "no difference" is read as "none larger
    than this" rather than "none"."""
    _check_open_unit(alpha, "alpha")
    _check_open_unit(power, "power")
    if sd_treatment < 0 or sd_control < 0:
        raise ValueError("standard deviations must be non-negative")
    if n_treatment <= 0 or n_control <= 0:
        raise ValueError(f"sample sizes must be positive, got {n_treatment} and {n_control}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z * math.sqrt(sd_treatment**2 / n_treatment + sd_control**2 / n_control))


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """Always-valid p-value and (1 − alpha) confidence interval from the mSPRT at one look.

    For the one-sample test `n_control` is 0. `low > high` can only happen after intersecting
    intervals over looks (`running_sequential`) and means every value has been rejected.
    """

    p_value: float
    low: float
    high: float
    tau: float
    n_treatment: int
    n_control: int


def msprt_log_likelihood_ratio(
    estimate: float, variance: float, tau: float, null: float = 0.0
) -> float:
    """log Λ of the normal-mixture SPRT for an estimate θ̂ ~ N(θ, V) and mixing θ ~ N(null, τ²):

        Λ = sqrt(V / (V + τ²)) · exp(τ² (θ̂ − null)² / (2 V (V + τ²))).

    With V = σt²/nt + σc²/nc this is Johari et al.'s two-sample statistic (for nt = nc = n,
    V = 2σ²/n gives their formula exactly); with V = σ²/n it is the one-sample one.
    """
    if not (variance > 0 and math.isfinite(variance)):
        raise ValueError(f"variance must be positive and finite, got {variance!r}")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be positive and finite, got {tau!r}")
    total = variance + tau**2
    return 0.5 * math.log(variance / total) + tau**2 * (estimate - null) ** 2 / (
        2 * variance * total
    )


def msprt_from_estimate(
    estimate: float,
    variance: float,
    tau: float,
    alpha: float = 0.05,
    n_treatment: int = 0,
    n_control: int = 0,
) -> SequentialResult:
    """The mSPRT at one look from sufficient statistics (estimate and its variance).

    p = min(1, 1/Λ(0)). The interval inverts the test in closed form: θ0 is kept while
    Λ(θ0) < 1/α, i.e. |θ̂ − θ0| < sqrt(2V(V+τ²)/τ² · (log(1/α) + ½ log((V+τ²)/V))).

    Choosing tau: the mixture puts its weight on effects of size about tau, and the test is most
    powerful for effects near it (Johari et al. §4). Set tau to the smallest effect worth acting on,
    in the metric's units (e.g. 0.2 judge-score points on the 1–5 scale). Any tau > 0 keeps the
    error guarantee; a badly chosen one only costs samples.
    """
    _check_open_unit(alpha, "alpha")
    log_lr = msprt_log_likelihood_ratio(estimate, variance, tau)
    p_value = 1.0 if log_lr <= 0 else math.exp(-log_lr)
    total = variance + tau**2
    half = math.sqrt(
        2 * variance * total / tau**2 * (math.log(1 / alpha) + 0.5 * math.log(total / variance))
    )
    return SequentialResult(
        p_value, estimate - half, estimate + half, tau, int(n_treatment), int(n_control)
    )


def msprt(treatment: Values, control: Values, tau: float, alpha: float = 0.05) -> SequentialResult:
    """Two-sample mSPRT for mean(treatment) − mean(control) with plug-in (Welch) variances."""
    t, c = as_sample(treatment, "treatment"), as_sample(control, "control")
    if len(t) < 2 or len(c) < 2:
        raise ValueError(f"need at least 2 observations per arm, got {len(t)} and {len(c)}")
    variance = t.var(ddof=1) / len(t) + c.var(ddof=1) / len(c)
    return msprt_from_estimate(float(t.mean() - c.mean()), variance, tau, alpha, len(t), len(c))


def one_sample_sequential(values: Values, tau: float, alpha: float = 0.05) -> SequentialResult:
    """One-sample mSPRT of mean(values) against 0 (e.g. pairwise scores: +1 win, 0 tie, −1 loss)."""
    x = as_sample(values, "values")
    if len(x) < 2:
        raise ValueError(f"need at least 2 observations, got {len(x)}")
    return msprt_from_estimate(float(x.mean()), x.var(ddof=1) / len(x), tau, alpha, len(x), 0)


def running_sequential(looks: Sequence[SequentialResult]) -> tuple[SequentialResult, ...]:
    """Combine per-look results into the running always-valid ones: the p-value is the running
    minimum and the interval the running intersection. Both stay valid (the guarantee holds
    uniformly over looks), and the p-value never goes back up after a look that rejected."""
    out: list[SequentialResult] = []
    for look in looks:
        if out:
            prev = out[-1]
            if look.tau != prev.tau:
                raise ValueError("all looks must use the same tau")
            look = replace(
                look,
                p_value=min(prev.p_value, look.p_value),
                low=max(prev.low, look.low),
                high=min(prev.high, look.high),
            )
        out.append(look)
    return tuple(out)


def _prefix_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Shift by the first value before accumulating so that sums of squares do not cancel badly.
    shifted = x - (x[0] if len(x) else 0.0)
    return np.cumsum(shifted), np.cumsum(shifted**2)


def always_valid_p_values(
    treatment: Values,
    control: Values,
    looks: Sequence[int | tuple[int, int]],
    tau: float,
    alpha: float = 0.05,
) -> tuple[SequentialResult, ...]:
    """The running mSPRT over a sequence of looks at growing prefixes of the two arms' streams.

    Each look is `(n_treatment, n_control)` (or one int for both): the first that many
    observations of each arm, in arrival order. Returns one running result per look.
    """
    t, c = as_sample(treatment, "treatment"), as_sample(control, "control")
    st, sst = _prefix_moments(t)
    sc, ssc = _prefix_moments(c)
    per_look: list[SequentialResult] = []
    last = (0, 0)
    for look in looks:
        nt, nc = (look, look) if isinstance(look, int | np.integer) else look
        if not (2 <= nt <= len(t) and 2 <= nc <= len(c)):
            raise ValueError(f"look {look!r} outside the data (2..{len(t)}, 2..{len(c)})")
        if nt < last[0] or nc < last[1]:
            raise ValueError(f"looks must not shrink: {look!r} after {last!r}")
        last = (nt, nc)
        mean_t, mean_c = st[nt - 1] / nt, sc[nc - 1] / nc
        var_t = max(sst[nt - 1] - nt * mean_t**2, 0.0) / (nt - 1)
        var_c = max(ssc[nc - 1] - nc * mean_c**2, 0.0) / (nc - 1)
        estimate = float((mean_t + t[0]) - (mean_c + c[0]))
        per_look.append(msprt_from_estimate(estimate, var_t / nt + var_c / nc, tau, alpha, nt, nc))
    return running_sequential(per_look)


@dataclass(frozen=True, slots=True)
class AbConfig:
    """How the A/B verdict is decided.

    tau is in the metric's units: the smallest difference worth acting on (see
    `msprt_from_estimate`). The default suits judge scores on the 1–5 scale.
    """

    alpha: float = 0.05
    power: float = 0.8
    tau: float = 0.2
    min_samples: int = 100
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        _check_open_unit(self.alpha, "alpha")
        _check_open_unit(self.power, "power")
        if not (isinstance(self.tau, int | float) and self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be positive and finite, got {self.tau!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int):
            raise ValueError(f"min_samples must be an integer, got {self.min_samples!r}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be at least 2, got {self.min_samples}")


@dataclass(frozen=True, slots=True)
class AbVerdict:
    """The decision and its evidence. `difference`, `sequential` and `mde` are None only when an
    arm has fewer than 2 samples (nothing can be estimated)."""

    verdict: Verdict
    difference: MeanDifference | None
    sequential: SequentialResult | None
    mde: float | None
    reason: str


def ab_verdict(
    treatment: Values,
    control: Values,
    config: AbConfig | None = None,
    previous: SequentialResult | None = None,
) -> AbVerdict:
    """Better / worse / inconclusive for treatment (challenger) vs control (champion).

    Decided on the always-valid interval, never on the fixed-n one, so the controller may call
    this at every look: better when the interval lies entirely on the good side of 0, worse when
    entirely on the bad side. Pass the last look's `sequential` as `previous` to carry the running
    p-value and interval forward (`running_sequential`). Below `min_samples` per arm the verdict is
    inconclusive whatever the data say: plug-in variances are unreliable there.
    """
    config = config or AbConfig()
    t, c = as_sample(treatment, "treatment"), as_sample(control, "control")
    nt, nc = len(t), len(c)
    need = f"need at least {config.min_samples} per arm, have {nt} challenger and {nc} champion"
    if min(nt, nc) < 2:
        return AbVerdict("inconclusive", None, None, None, f"too few samples: {need}")
    difference = mean_difference(t, c, 1 - config.alpha)
    mde = minimum_detectable_effect(
        float(t.std(ddof=1)), float(c.std(ddof=1)), nt, nc, config.alpha, config.power
    )
    if difference.se == 0.0:
        reason = "no variation in either arm: cannot test"
        return AbVerdict("inconclusive", difference, None, mde, reason)
    sequential = msprt_from_estimate(
        difference.diff, difference.se**2, config.tau, config.alpha, nt, nc
    )
    if previous is not None:
        sequential = running_sequential([previous, sequential])[-1]
    if min(nt, nc) < config.min_samples:
        return AbVerdict("inconclusive", difference, sequential, mde, f"too few samples: {need}")
    interval = (
        f"always-valid {1 - config.alpha:.0%} interval [{sequential.low:+.4g}, "
        f"{sequential.high:+.4g}], p = {sequential.p_value:.3g}"
    )
    if sequential.low > 0 or sequential.high < 0:
        good = (sequential.low > 0) == config.higher_is_better
        side = "above" if sequential.low > 0 else "below"
        return AbVerdict(
            "better" if good else "worse", difference, sequential, mde, f"{interval} is {side} 0"
        )
    reason = f"{interval} contains 0; minimum detectable effect at this n is {mde:.4g}"
    return AbVerdict("inconclusive", difference, sequential, mde, reason)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927; Newcombe 1998, method 3). Unlike the
    Wald interval it stays inside [0, 1] and keeps its coverage near 0 and 1 — fallback rates of a
    few percent are exactly there. With n = 0 it returns the uninformative (0, 1)."""
    _check_open_unit(confidence, "confidence")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def pairwise_scores(outcomes: Sequence[str]) -> np.ndarray:
    """+1 for a win, 0 for a tie, −1 for a loss (from the challenger's side)."""
    unknown = sorted({o for o in outcomes if o not in _OUTCOME_SCORE})
    if unknown:
        raise ValueError(f"outcomes must be 'win', 'tie' or 'loss', got {unknown}")
    return np.array([_OUTCOME_SCORE[o] for o in outcomes], dtype=float)


@dataclass(frozen=True, slots=True)
class PairwiseSummary:
    """Pairwise judge outcomes; rates are NaN when n = 0, `sequential` is None when fewer than 2
    outcomes or all outcomes are identical (the plug-in variance is then zero)."""

    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    tie_rate: float
    loss_rate: float
    win_or_tie_rate: float
    win_or_tie_ci: tuple[float, float]
    score: float
    sequential: SequentialResult | None


def pairwise_summary(
    outcomes: Sequence[str], confidence: float = 0.95, tau: float = 0.1, alpha: float = 0.05
) -> PairwiseSummary:
    """Summarise win/tie/loss outcomes. The score (mean of +1/0/−1, in [−1, 1]) is tested against 0
    with the one-sample mSPRT; tau is in score units (0.1 = win rate minus loss rate of 10 points).
    """
    scores = pairwise_scores(outcomes)
    n = len(scores)
    wins, ties = int((scores == 1).sum()), int((scores == 0).sum())
    losses = n - wins - ties

    def rate(k: int) -> float:
        return k / n if n else math.nan

    sequential = None
    if n >= 2 and scores.var() > 0:
        sequential = one_sample_sequential(scores, tau, alpha)
    return PairwiseSummary(
        n,
        wins,
        ties,
        losses,
        rate(wins),
        rate(ties),
        rate(losses),
        rate(wins + ties),
        wilson_interval(wins + ties, n, confidence),
        float(scores.mean()) if n else math.nan,
        sequential,
    )


@dataclass(frozen=True, slots=True)
class ArmSummary:
    """One arm's dashboard numbers. `n` counts requests; `judge_n` the judged subset."""

    arm: str
    n: int
    judge_n: int
    judge_mean: float
    judge_ci: tuple[float, float]
    fallback_rate: float
    fallback_ci: tuple[float, float]
    latency_p50: float
    latency_p95: float
    latency_p99: float
    error_rate: float


def summarize_arm(
    arm: str,
    judge_scores: Sequence[float],
    fallbacks: Sequence[bool],
    latencies_s: Sequence[float],
    errors: Sequence[bool],
    confidence: float = 0.95,
) -> ArmSummary:
    """Per-arm summary; `fallbacks`, `latencies_s`, `errors` hold one entry per request, judge
    scores whichever requests were judged. No traffic gives NaN, not an error (0 % is normal)."""
    if not len(fallbacks) == len(latencies_s) == len(errors):
        raise ValueError(
            "fallbacks, latencies_s and errors must have one entry per request, got lengths "
            f"{len(fallbacks)}, {len(latencies_s)}, {len(errors)}"
        )
    scores = as_sample(judge_scores, "judge_scores")
    latencies = as_sample(latencies_s, "latencies_s")
    n, judge_n = len(latencies), len(scores)
    judge_ci = (math.nan, math.nan)
    if judge_n >= 2:
        se = float(scores.std(ddof=1)) / math.sqrt(judge_n)
        half = float(stats.t.ppf(0.5 + confidence / 2, judge_n - 1)) * se
        judge_ci = (float(scores.mean()) - half, float(scores.mean()) + half)
    n_fallback, n_error = sum(bool(f) for f in fallbacks), sum(bool(e) for e in errors)
    quantiles = np.percentile(latencies, [50, 95, 99]) if n else [math.nan] * 3
    return ArmSummary(
        arm,
        n,
        judge_n,
        float(scores.mean()) if judge_n else math.nan,
        judge_ci,
        n_fallback / n if n else math.nan,
        wilson_interval(n_fallback, n, confidence),
        *(float(q) for q in quantiles),
        n_error / n if n else math.nan,
    )
