"""Calibrating the fallback threshold: Learn-then-Test, and the quality-vs-student-share curve.

The gateway serves the student's answer iff its confidence is at least the threshold (and not
−inf), else the teacher answers. `ltt_threshold` picks, on a held-out set of scored student
answers labelled acceptable or not, the lowest threshold (the largest student share) whose rate
of unacceptable student-served answers is ≤ ε with probability ≥ 1 − δ over the draw of the
held-out set — Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021) with exact
binomial p-values and fixed-sequence testing, which needs no model of how confidence relates to
quality. `routing_curve` and `apgr` measure how good the confidence is as a router, the way
RouteLLM (Ong et al. 2024) does: quality against the share routed to the cheap model, and the
average performance gap recovered (APGR).

Pure functions over numpy arrays; scipy for the binomial and beta distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import beta, binom

Risk = Literal["served", "all"]
RISKS: tuple[Risk, ...] = ("served", "all")
UNCERTIFIED_THRESHOLD = 0.0  # every signal is ≤ 0: serve (almost) nothing on the student


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen threshold and what it did on the calibration set.

    `risk_hat` is the empirical risk at `threshold` (unacceptable among served for "served",
    unacceptable-and-served among all for "all"; 0.0 when nothing is served), `risk_upper`
    its one-sided Clopper–Pearson upper bound at level 1 − δ (certified ⟺ ≤ ε), `p_value` the
    binomial p-value there, `candidates_tested` how many thresholds the sequence tested.
    """

    threshold: float
    certified: bool
    epsilon: float
    delta: float
    risk: Risk
    n: int
    n_served: int
    student_share: float
    risk_hat: float
    risk_upper: float
    p_value: float
    candidates_tested: int


def _check_level(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _arrays(scores: ArrayLike, flags: ArrayLike, what: str) -> tuple[NDArray, NDArray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    f = np.asarray(flags).reshape(-1)
    if s.shape != f.shape:
        raise ValueError(f"scores and {what} differ in length: {s.size} vs {f.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; score every answer (a missing score is -inf)")
    return s, f


def _labels(unacceptable: NDArray) -> NDArray:
    if unacceptable.dtype != bool:
        if not np.isin(unacceptable, (0, 1)).all():
            raise ValueError("unacceptable must hold booleans (or 0/1)")
        unacceptable = unacceptable.astype(bool)
    return unacceptable


def _check_risk(risk: str) -> None:
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")


def served_mask(scores: NDArray, threshold: float) -> NDArray:
    """Which answers the gateway serves: score ≥ threshold, never −inf (as
    `serving.gateway.confidence.is_low` decides)."""
    return (scores >= threshold) & (scores != -np.inf)


def _counts(served: NDArray, unacceptable: NDArray, risk: Risk) -> tuple[int, int]:
    """(k, n) of the binomial test: errors and trials under the risk definition."""
    bad = int((served & unacceptable).sum())
    return bad, int(served.sum()) if risk == "served" else int(served.size)


def _sequence_counts(
    scores: NDArray, unacceptable: NDArray, thresholds: NDArray, risk: Risk
) -> tuple[NDArray, NDArray]:
    """`_counts` at every threshold at once: one sort, suffix sums of the errors (O(n log n)
    rather than one pass over the data per candidate)."""
    order = np.argsort(scores, kind="stable")
    ordered, bad = scores[order], unacceptable[order].astype(np.int64)
    bad_from = np.r_[np.cumsum(bad[::-1])[::-1], 0]  # errors at sorted index ≥ i
    first = np.searchsorted(ordered, thresholds, side="left")  # thresholds are finite
    k = bad_from[first]
    n = scores.size - first if risk == "served" else np.full(first.shape, scores.size)
    return k, n


def binomial_p_value(k: int, n: int, epsilon: float) -> float:
    """P(Binom(n, ε) ≤ k): small when k errors in n would be unlikely were the risk ε.

    It is a valid p-value for H: risk > ε, since Binom(n, r) for r > ε is stochastically
    larger. n = 0 gives 1 (no evidence)."""
    return float(binom.cdf(k, n, epsilon)) if n > 0 else 1.0


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided upper confidence bound for a binomial rate at level 1 − δ (exact)."""
    if n == 0 or k >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, k + 1, n - k))


def min_served_to_certify(epsilon: float, delta: float, errors: int = 0) -> int:
    """The fewest served answers that can certify anything with at most `errors` of them
    unacceptable. With zero errors the p-value is (1 − ε)^n, so n ≥ log δ / log(1 − ε)."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-epsilon)))
    # The ceiling may be off by one in floating point; settle it on the p-value itself.
    while n > 1 and binomial_p_value(0, n - 1, epsilon) <= delta:
        n -= 1
    while binomial_p_value(errors, n, epsilon) > delta:
        n += 1
    return n


def candidate_thresholds(scores: NDArray, max_candidates: int) -> NDArray:
    """The thresholds to test, highest (most conservative) first: the distinct finite scores,
    thinned to at most `max_candidates` score quantiles. Quantiles by the "inverted_cdf" rule
    are scores themselves, so each candidate serves exactly the answers scoring at or above
    it, as the gateway would."""
    finite = scores[np.isfinite(scores)]
    values = np.unique(finite)
    if values.size > max_candidates:
        levels = np.linspace(0.0, 1.0, max_candidates)
        values = np.unique(np.quantile(finite, levels, method="inverted_cdf"))
    return values[::-1]


def ltt_threshold(
    scores: ArrayLike,
    unacceptable: ArrayLike,
    *,
    epsilon: float,
    delta: float,
    risk: Risk = "served",
    max_candidates: int = 200,
    start_errors: int = 0,
) -> CalibrationResult:
    """The lowest confidence threshold certified to keep the risk ≤ ε with probability ≥ 1 − δ.

    Fixed-sequence testing: candidates (see `candidate_thresholds`) go from the highest
    threshold down; each null H_λ "risk at λ > ε" is rejected while its p-value
    P(Binom(n, ε) ≤ k) is ≤ δ, and the walk stops at the first non-rejection. A false
    rejection needs the first true null in the sequence to be rejected, which happens with
    probability ≤ δ — so the family-wise error is ≤ δ with no correction for the number of
    candidates. The threshold is the lowest rejected λ.

    risk="served": k = unacceptable among served, n = served (H: P(unacceptable | served) > ε).
    The highest candidates serve too few answers to ever reject, so leading candidates with
    n below `min_served_to_certify` are skipped instead of ending the walk. That is sound
    because the grid and the skip depend only on the scores, never on the labels: conditional
    on the scores the sequence is fixed in advance and the labels are independent draws, so
    the fixed-sequence argument holds given the scores. (Given the scores the error count is
    Poisson-binomial rather than binomial; in the tail where p ≤ δ it is dominated by the
    binomial of the same mean, Hoeffding 1956, so the p-values stay valid. The unit tests
    check the guarantee on the population risk by simulation.)
    `start_errors` > 0 starts the walk later, at the first candidate where that many errors
    could still be certified (still label-free, so still valid). Starting where none may be
    tolerated lets one confidently wrong answer among the top few end the walk: in the unit
    tests' simulation (n = 400, ε = δ = 0.1) the median student share doubles with 1–2.
    risk="all": k = unacceptable and served, n = all answers (H: P(unacceptable ∧ served) > ε).

    −inf scores are never served (the gateway always falls back on them) but count in n for
    "all". Nothing certified: `certified=False`, threshold 0.0 (serve almost nothing).
    """
    _check_level("epsilon", epsilon)
    _check_level("delta", delta)
    _check_risk(risk)
    if not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"max_candidates must be a positive integer, got {max_candidates!r}")
    if not isinstance(start_errors, int) or start_errors < 0:
        raise ValueError(f"start_errors must be a non-negative integer, got {start_errors!r}")
    s, flags = _arrays(scores, unacceptable, "unacceptable")
    if s.size == 0:
        raise ValueError("no calibration data: scores is empty")
    bad = _labels(flags)
    n_min = min_served_to_certify(epsilon, delta, start_errors) if risk == "served" else 0
    lams = candidate_thresholds(s, max_candidates)
    ks, ns = _sequence_counts(s, bad, lams, risk)
    chosen: float | None = None
    tested = 0
    for lam, k, n in zip(lams, ks, ns, strict=True):
        if n < n_min:
            continue  # too few served to ever reject: skip, do not stop (see above)
        tested += 1
        if binomial_p_value(int(k), int(n), epsilon) > delta:
            break
        chosen = float(lam)
    threshold = UNCERTIFIED_THRESHOLD if chosen is None else chosen
    served = served_mask(s, threshold)
    k, n = _counts(served, bad, risk)
    return CalibrationResult(
        threshold=threshold,
        certified=chosen is not None,
        epsilon=float(epsilon),
        delta=float(delta),
        risk=risk,
        n=int(s.size),
        n_served=int(served.sum()),
        student_share=float(served.mean()),
        risk_hat=k / n if n else 0.0,
        risk_upper=clopper_pearson_upper(k, n, delta),
        p_value=binomial_p_value(k, n, epsilon),
        candidates_tested=tested,
    )


def evaluate_threshold(
    scores: ArrayLike, unacceptable: ArrayLike, threshold: float, risk: Risk = "served"
) -> tuple[float, float, int]:
    """(student share, realised risk, answers served) of `threshold` on fresh data; the risk
    as `ltt_threshold` defines it (0.0 when nothing is served under "served")."""
    _check_risk(risk)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    s, flags = _arrays(scores, unacceptable, "unacceptable")
    if s.size == 0:
        raise ValueError("no data to evaluate: scores is empty")
    served = served_mask(s, threshold)
    k, n = _counts(served, _labels(flags), risk)
    return float(served.mean()), (k / n if n else 0.0), int(served.sum())


# ---- the quality-vs-student-share curve and APGR (RouteLLM) ----------------------------------


@dataclass(frozen=True)
class RoutingCurve:
    """Mean quality per request against the share of requests the student answers, for the
    confidence router, random routing and the oracle. `share_on_student` runs 0 → 1, so
    index 0 is teacher-only and the last index student-only (identical for all three)."""

    share_on_student: NDArray
    router: NDArray
    random: NDArray
    oracle: NDArray

    @property
    def teacher_only(self) -> float:
        return float(self.router[0])

    @property
    def student_only(self) -> float:
        return float(self.router[-1])

    def rows(self) -> list[dict[str, float]]:
        """The curve as table rows (one per grid point), e.g. for an MLflow table."""
        points = zip(self.share_on_student, self.router, self.random, self.oracle, strict=True)
        keys = ("share_on_student", "router", "random", "oracle")
        return [dict(zip(keys, map(float, point), strict=True)) for point in points]


def _tie_averaged(scores: NDArray, gains: NDArray) -> NDArray:
    """Gains in routing order (highest score first) with tied scores sharing their mean gain:
    the gateway cannot split a tie, so its expected quality is that of a random tie-break."""
    order = np.argsort(-scores, kind="stable")
    s, g = scores[order], gains[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    sums = np.add.reduceat(g, starts)
    sizes = np.diff(np.r_[starts, s.size])
    return np.repeat(sums / sizes, sizes)


def _quality_at(cum_gain: NDArray, base: float, m: NDArray, n: int) -> NDArray:
    """Mean quality with m (real, interpolated) items moved from teacher to student."""
    return (base + np.interp(m, np.arange(n + 1), cum_gain)) / n


def routing_curve(
    scores: ArrayLike,
    student_quality: ArrayLike,
    teacher_quality: ArrayLike | None = None,
    points: int = 101,
) -> RoutingCurve:
    """Quality vs student share: the router sends the most confident items to the student
    first, the oracle the items where the student loses least (q_s − q_t largest, i.e. where
    it is acceptable first), random routing interpolates linearly. A fractional number of
    items interpolates between whole ones. Teacher quality defaults to 1.0 per item (the
    teacher is the reference)."""
    if not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    s, qs = _arrays(scores, student_quality, "student_quality")
    qs = qs.astype(float)
    qt = np.ones_like(qs) if teacher_quality is None else np.asarray(teacher_quality, float)
    if qt.shape != qs.shape:
        raise ValueError(f"teacher_quality differs in length: {qt.size} vs {qs.size}")
    if s.size == 0:
        raise ValueError("no data for a routing curve: scores is empty")
    if not (np.isfinite(qs).all() and np.isfinite(qt).all()):
        raise ValueError("qualities must be finite numbers")
    n, gains, base = s.size, qs - qt, float(qt.sum())
    share = np.linspace(0.0, 1.0, points)
    m = share * n

    def curve(ordered_gains: NDArray) -> NDArray:
        return _quality_at(np.r_[0.0, np.cumsum(ordered_gains)], base, m, n)

    return RoutingCurve(
        share_on_student=share,
        router=curve(_tie_averaged(s, gains)),
        random=(base + m * gains.mean()) / n,
        oracle=curve(np.sort(gains)[::-1]),
    )


@dataclass(frozen=True)
class Apgr:
    """APGR of the router, random routing (0.5 by construction) and the oracle, and the
    router's share of the area between the random and oracle curves,
    (router − random)/(oracle − random). NaN with a `note` where undefined."""

    router: float
    random: float
    oracle: float
    gain_over_random: float
    note: str | None = None


def _pgr_area(quality: NDArray, share: NDArray, weak: float, strong: float) -> float:
    # PGR against the share sent to the teacher; the area is the same over the student share.
    pgr = (quality - weak) / (strong - weak)
    return float(np.trapezoid(pgr, share))


def apgr(curve: RoutingCurve, tol: float = 1e-12) -> Apgr:
    """RouteLLM's APGR: the area under PGR = (q_router − q_student_only)/(q_teacher_only −
    q_student_only) over the share of calls to the teacher, 0 → 1 (trapezoid rule on the
    curve's grid). Random routing scores 0.5. When student and teacher are equally good on
    average the gap is 0 and APGR is undefined: NaN with a note, never a division by zero."""
    weak, strong = curve.student_only, curve.teacher_only
    if abs(strong - weak) <= tol:
        nan = math.nan
        return Apgr(nan, nan, nan, nan, "student and teacher quality are equal: no gap")
    x = curve.share_on_student
    router = _pgr_area(curve.router, x, weak, strong)
    random = _pgr_area(curve.random, x, weak, strong)
    oracle = _pgr_area(curve.oracle, x, weak, strong)
    if abs(oracle - random) <= tol:
        note = "the oracle is no better than random routing (every item gains the same)"
        return Apgr(router, random, oracle, math.nan, note)
    return Apgr(router, random, oracle, (router - random) / (oracle - random))


def summarize_curve(curve: RoutingCurve, shares: Sequence[float]) -> list[dict[str, float]]:
    """The curve at a few student shares (interpolated), for a short printed table."""
    x = curve.share_on_student
    return [
        {
            "share_on_student": float(s),
            "router": float(np.interp(s, x, curve.router)),
            "random": float(np.interp(s, x, curve.random)),
            "oracle": float(np.interp(s, x, curve.oracle)),
        }
        for s in shares
    ]
