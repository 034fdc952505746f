"""A/B statistics: the SRM alarm on a broken split (and its silence on a true one), Welch coverage,
the mSPRT's type-I error under peeking against a naive t-test's, its power and monotone p-value,
the closed-form interval inversion, the MDE's 1/sqrt(n) law, the verdict table, Wilson's interval
on published values, and the pairwise and per-arm summaries."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from stillhouse.eval.abtest import (
    AbConfig,
    ab_verdict,
    always_valid_p_values,
    mean_difference,
    minimum_detectable_effect,
    msprt,
    msprt_from_estimate,
    msprt_log_likelihood_ratio,
    one_sample_sequential,
    pairwise_summary,
    running_sequential,
    srm_check,
    summarize_arm,
    wilson_interval,
)

JUDGE_LEVELS = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
JUDGE_PROBS = np.array([0.05, 0.10, 0.25, 0.35, 0.25])  # mean 3.65, sd ≈ 1.1
LOOKS = list(range(50, 2001, 50))


def judge_scores(rng: np.random.Generator, size) -> np.ndarray:
    return rng.choice(JUDGE_LEVELS, size=size, p=JUDGE_PROBS)


# --------------------------------------------------------------------------- SRM


def test_srm_fires_on_configured_50_50_that_is_really_45_55():
    rng = np.random.default_rng(7)
    challenger = int(rng.binomial(10_000, 0.45))
    result = srm_check(
        {"champion": 10_000 - challenger, "challenger": challenger},
        {"champion": 0.5, "challenger": 0.5},
    )
    assert result.alarm
    assert result.p_value < 1e-10
    assert result.expected == {"champion": 5_000.0, "challenger": 5_000.0}


def test_srm_does_not_fire_on_true_50_50_over_twenty_seeds():
    alarms = 0
    for seed in range(20):
        challenger = int(np.random.default_rng(seed).binomial(10_000, 0.5))
        counts = {"champion": 10_000 - challenger, "challenger": challenger}
        alarms += srm_check(counts, {"champion": 0.5, "challenger": 0.5}).alarm
    assert alarms == 0


def test_srm_checks_against_the_configured_uneven_share():
    shares = {"champion": 0.9, "challenger": 0.1}
    assert not srm_check({"champion": 9_000, "challenger": 1_000}, shares).alarm
    assert srm_check({"champion": 8_800, "challenger": 1_200}, shares).alarm  # 12 % at 10 %
    assert srm_check({"champion": 5_000, "challenger": 5_000}, shares).alarm


def test_srm_hand_computed_chi_square():
    result = srm_check({"a": 4_500, "b": 5_500}, {"a": 0.5, "b": 0.5})
    assert result.chi2 == pytest.approx(100.0)  # 2 · 500² / 5000
    assert result.p_value == pytest.approx(stats.chi2.sf(100.0, 1))


def test_srm_traffic_to_a_zero_share_arm_is_an_alarm():
    result = srm_check({"champion": 100, "challenger": 1}, {"champion": 1.0, "challenger": 0.0})
    assert result.alarm and result.p_value == 0.0
    assert not srm_check(
        {"champion": 100, "challenger": 0}, {"champion": 1.0, "challenger": 0.0}
    ).alarm


@pytest.mark.parametrize(
    ("counts", "shares", "message"),
    [
        ({"a": 1, "b": 1}, {"a": 0.6, "b": 0.6}, "sum to 1"),
        ({"a": -1, "b": 1}, {"a": 0.5, "b": 0.5}, "non-negative"),
        ({"a": 1, "b": 1}, {"a": 0.5, "c": 0.5}, "arms differ"),
        ({"a": 1}, {"a": 1.0}, "two arms"),
        ({"a": 1, "b": 1}, {"a": 1.5, "b": -0.5}, r"\[0, 1\]"),
    ],
)
def test_srm_rejects_bad_input(counts, shares, message):
    with pytest.raises(ValueError, match=message):
        srm_check(counts, shares)


# --------------------------------------------------------------------------- Welch


def test_welch_interval_covers_true_difference_about_95_percent():
    rng = np.random.default_rng(11)
    covered = 0
    for _ in range(400):
        # Unequal sizes and variances: where a pooled-variance interval would mis-cover.
        t = rng.normal(1.3, 2.0, size=20)
        c = rng.normal(1.0, 0.5, size=200)
        d = mean_difference(t, c)
        covered += d.low <= 0.3 <= d.high
    assert 0.92 <= covered / 400 <= 0.98


def test_welch_hand_computed_example():
    d = mean_difference([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    assert d.diff == pytest.approx(0.5)
    assert d.se == pytest.approx(math.sqrt(5 / 3 / 4 + 0.8 / 6))
    welch = stats.ttest_ind([1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2, 3, 3], equal_var=False)
    ci = welch.confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert (d.n_treatment, d.n_control, d.mean_treatment, d.mean_control) == (4, 6, 2.5, 2.0)


def test_welch_needs_two_observations_per_arm():
    with pytest.raises(ValueError, match="at least 2"):
        mean_difference([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------- mSPRT


def aa_streams(seed: int, sims: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return judge_scores(rng, (sims, LOOKS[-1])), judge_scores(rng, (sims, LOOKS[-1]))


def test_msprt_keeps_type_one_error_under_repeated_looks_where_naive_t_test_does_not():
    t, c = aa_streams(seed=3)
    msprt_rejections = sum(
        always_valid_p_values(t[s], c[s], LOOKS, tau=0.2)[-1].p_value < 0.05 for s in range(len(t))
    )
    naive_rejected = np.zeros(len(t), dtype=bool)
    for n in LOOKS:  # the same 40 looks, each read as if it were the only one
        naive_rejected |= stats.ttest_ind(t[:, :n], c[:, :n], axis=1, equal_var=False).pvalue < 0.05
    assert msprt_rejections / len(t) <= 0.05 + 0.02
    assert naive_rejected.mean() > 0.15  # peeking inflates the 5 % test several-fold


def test_msprt_detects_a_real_effect_in_the_right_direction():
    rng = np.random.default_rng(5)
    for _ in range(10):
        control = judge_scores(rng, 2_000)
        treatment = judge_scores(rng, 2_000) + 0.3
        final = always_valid_p_values(treatment, control, LOOKS, tau=0.2)[-1]
        assert final.p_value < 0.05
        assert 0 < final.low < 0.3 < final.high


def test_always_valid_p_is_non_increasing_across_looks():
    t, c = aa_streams(seed=0, sims=1)
    raw = [msprt(t[0, :n], c[0, :n], tau=0.2).p_value for n in LOOKS]
    assert any(b > a for a, b in itertools.pairwise(raw))  # raw p does go back up
    running = always_valid_p_values(t[0], c[0], LOOKS, tau=0.2)
    p = [r.p_value for r in running]
    assert all(b <= a for a, b in itertools.pairwise(p))
    assert p == pytest.approx(list(np.minimum.accumulate(raw)))
    assert all(b.low >= a.low and b.high <= a.high for a, b in itertools.pairwise(running))


def test_prefix_looks_match_direct_computation_on_uneven_arms():
    rng = np.random.default_rng(2)
    t, c = judge_scores(rng, 300), judge_scores(rng, 2_700)
    looks = [(30, 270), (120, 1_100), (300, 2_700)]
    per_look = [msprt(t[:nt], c[:nc], tau=0.2) for nt, nc in looks]
    for got, want in zip(
        always_valid_p_values(t, c, looks, tau=0.2), running_sequential(per_look), strict=True
    ):
        assert (got.p_value, got.low, got.high) == pytest.approx(
            (want.p_value, want.low, want.high)
        )
        assert (got.n_treatment, got.n_control) == (want.n_treatment, want.n_control)


def test_msprt_interval_is_the_closed_form_inversion_of_the_test():
    estimate, variance, tau, alpha = 0.12, 0.003, 0.2, 0.05
    result = msprt_from_estimate(estimate, variance, tau, alpha)
    for edge in (result.low, result.high):  # Λ(θ0) = 1/α exactly on the boundary
        log_lr = msprt_log_likelihood_ratio(estimate, variance, tau, null=edge)
        assert log_lr == pytest.approx(math.log(1 / alpha))
    assert msprt_log_likelihood_ratio(estimate, variance, tau, null=estimate) < math.log(1 / alpha)
    # p < alpha exactly when 0 lies outside the interval.
    assert (result.p_value < alpha) == (not result.low < 0 < result.high)


def test_msprt_statistic_matches_johari_equal_n_formula():
    n, sigma2, tau, diff = 400, 1.3, 0.2, 0.15
    johari = math.sqrt(2 * sigma2 / (2 * sigma2 + n * tau**2)) * math.exp(
        n**2 * tau**2 * diff**2 / (4 * sigma2 * (2 * sigma2 + n * tau**2))
    )
    assert msprt_log_likelihood_ratio(diff, 2 * sigma2 / n, tau) == pytest.approx(math.log(johari))


def test_one_sample_sequential_tests_mean_against_zero():
    rng = np.random.default_rng(4)
    assert one_sample_sequential(rng.normal(0.3, 1.0, 1_000), tau=0.1).low > 0
    null = one_sample_sequential(rng.normal(0.0, 1.0, 1_000), tau=0.1)
    assert null.low < 0 < null.high and null.p_value > 0.05
    assert null.n_control == 0


def test_mde_shrinks_as_one_over_sqrt_n():
    base = minimum_detectable_effect(1.0, 1.0, 100, 100)
    assert base == pytest.approx((1.959964 + 0.841621) * math.sqrt(0.02), rel=1e-5)
    assert minimum_detectable_effect(1.0, 1.0, 400, 400) == pytest.approx(base / 2)
    assert minimum_detectable_effect(1.0, 1.0, 10_000, 10_000) == pytest.approx(base / 10)


# --------------------------------------------------------------------------- verdict


def shifted_arms(shift: float, n: int = 2_000, seed: int = 21):
    rng = np.random.default_rng(seed)
    return judge_scores(rng, n) + shift, judge_scores(rng, n)


@pytest.mark.parametrize(
    ("shift", "higher_is_better", "expected"),
    [
        (0.3, True, "better"),
        (-0.3, True, "worse"),
        (0.0, True, "inconclusive"),
        (0.3, False, "worse"),  # e.g. latency: higher treatment values are worse
        (-0.3, False, "better"),
    ],
)
def test_verdict_table(shift, higher_is_better, expected):
    treatment, control = shifted_arms(shift)
    verdict = ab_verdict(treatment, control, AbConfig(higher_is_better=higher_is_better))
    assert verdict.verdict == expected
    assert verdict.sequential is not None and verdict.difference is not None
    assert verdict.difference.diff == pytest.approx(shift, abs=0.1)


def test_verdict_inconclusive_reports_mde():
    verdict = ab_verdict(*shifted_arms(0.0))
    assert "contains 0" in verdict.reason and "minimum detectable effect" in verdict.reason
    assert verdict.mde == pytest.approx(0.097, abs=0.01)  # 2.8 · 1.1 · sqrt(2/2000)


def test_verdict_below_min_samples_is_inconclusive_even_with_a_huge_effect():
    treatment, control = shifted_arms(2.0, n=50)
    verdict = ab_verdict(treatment, control, AbConfig(min_samples=100))
    assert verdict.verdict == "inconclusive"
    assert "too few samples" in verdict.reason and "100" in verdict.reason
    assert ab_verdict(treatment, control, AbConfig(min_samples=20)).verdict == "better"


def test_verdict_with_single_sample_arm_has_no_estimates():
    verdict = ab_verdict([4.0], [3.0, 4.0, 5.0])
    assert verdict.verdict == "inconclusive"
    assert verdict.difference is None and verdict.sequential is None and verdict.mde is None


def test_verdict_carries_previous_look_forward():
    treatment, control = shifted_arms(0.0)
    earlier = msprt_from_estimate(0.5, 0.01, 0.2, 0.05)  # an earlier look that rejected
    verdict = ab_verdict(treatment, control, previous=earlier)
    assert verdict.sequential.p_value == earlier.p_value
    assert verdict.sequential.low == pytest.approx(earlier.low)


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 0.0}, {"alpha": 1.0}, {"power": 1.2}, {"tau": 0.0}, {"tau": -1.0},
     {"min_samples": 1}, {"min_samples": 2.5}],
)  # fmt: skip
def test_ab_config_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError):
        AbConfig(**kwargs)


# --------------------------------------------------------------------------- pairwise, per arm


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
     (1, 29, 0.0061, 0.1718)],
)  # fmt: skip
def test_wilson_interval_matches_published_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_with_no_data_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_pairwise_summary_counts_and_score():
    summary = pairwise_summary(["win"] * 6 + ["tie"] * 1 + ["loss"] * 3)
    assert (summary.n, summary.wins, summary.ties, summary.losses) == (10, 6, 1, 3)
    assert (summary.win_rate, summary.tie_rate, summary.loss_rate) == (0.6, 0.1, 0.3)
    assert summary.win_or_tie_rate == 0.7
    assert summary.win_or_tie_ci == wilson_interval(7, 10)
    assert summary.score == pytest.approx(0.3)


def test_pairwise_score_sequential_detects_a_challenger_that_wins_more():
    rng = np.random.default_rng(8)
    outcomes = list(rng.choice(["win", "tie", "loss"], size=600, p=[0.5, 0.2, 0.3]))
    assert pairwise_summary(outcomes).sequential.low > 0
    even = list(rng.choice(["win", "tie", "loss"], size=600, p=[0.4, 0.2, 0.4]))
    assert pairwise_summary(even).sequential.low < 0 < pairwise_summary(even).sequential.high


def test_pairwise_rejects_unknown_outcomes():
    with pytest.raises(ValueError, match="draw"):
        pairwise_summary(["win", "draw"])


def test_summarize_arm():
    summary = summarize_arm(
        "challenger",
        judge_scores=[4.0, 5.0, 3.0, 4.0],
        fallbacks=[False, True, False, False, False],
        latencies_s=[0.1, 0.2, 0.3, 0.4, 1.0],
        errors=[False, False, False, False, True],
    )
    assert (summary.n, summary.judge_n, summary.judge_mean) == (5, 4, 4.0)
    half = stats.t.ppf(0.975, 3) * math.sqrt(2 / 3) / 2
    assert summary.judge_ci == pytest.approx((4.0 - half, 4.0 + half))
    assert summary.fallback_rate == 0.2 and summary.fallback_ci == wilson_interval(1, 5)
    assert summary.latency_p50 == pytest.approx(0.3)
    assert summary.latency_p95 == pytest.approx(0.88)  # linear: 0.4 + 0.8 · (1.0 − 0.4)
    assert summary.error_rate == 0.2


def test_summarize_arm_with_no_traffic_is_nan_not_an_error():
    summary = summarize_arm("challenger", [], [], [], [])
    assert summary.n == 0 and math.isnan(summary.fallback_rate) and math.isnan(summary.latency_p99)


def test_summarize_arm_rejects_misaligned_request_sequences():
    with pytest.raises(ValueError, match="one entry per request"):
        summarize_arm("champion", [], [False], [0.1, 0.2], [False])
