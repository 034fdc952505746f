"""Calibration of the fallback threshold (Learn-then-Test) and the routing curve / APGR: hand-worked
examples, the statistical guarantee checked by simulation, and input validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from stillhouse.rollout.calibration.ltt import (
    apgr,
    binomial_p_value,
    candidate_thresholds,
    clopper_pearson_upper,
    evaluate_threshold,
    ltt_threshold,
    min_served_to_certify,
    routing_curve,
)

# ---- p-values and bounds, by hand ---------------------------------------------------------


def test_binomial_p_value_is_the_exact_lower_tail():
    # P(Binom(20, 0.1) <= 1) = 0.9^20 + 20 * 0.1 * 0.9^19
    assert binomial_p_value(1, 20, 0.1) == pytest.approx(0.9**20 + 2.0 * 0.9**19, rel=1e-12)
    assert binomial_p_value(0, 22, 0.1) == pytest.approx(0.9**22, rel=1e-12)
    assert binomial_p_value(0, 0, 0.1) == 1.0  # nothing served: no evidence


@pytest.mark.parametrize(
    ("epsilon", "delta", "expected"),
    [(0.1, 0.1, 22), (0.05, 0.1, 45), (0.1, 0.05, 29), (0.5, 0.5, 1), (0.01, 0.1, 230)],
)
def test_min_served_to_certify_is_the_smallest_n_with_zero_errors_below_delta(
    epsilon, delta, expected
):
    n = min_served_to_certify(epsilon, delta)
    assert n == expected
    assert (1 - epsilon) ** n <= delta < (1 - epsilon) ** (n - 1) or n == 1


@pytest.mark.parametrize("errors", [1, 2, 5])
def test_min_served_to_certify_with_errors_is_the_smallest_n_that_can_tolerate_them(errors):
    n = min_served_to_certify(0.1, 0.1, errors)
    assert binomial_p_value(errors, n, 0.1) <= 0.1 < binomial_p_value(errors, n - 1, 0.1)


@pytest.mark.parametrize(("k", "n"), [(0, 25), (3, 40), (10, 50)])
def test_clopper_pearson_upper_bound_is_below_epsilon_exactly_when_p_is_below_delta(k, n):
    delta = 0.1
    upper = clopper_pearson_upper(k, n, delta)
    for eps in (upper - 1e-6, upper + 1e-6):
        assert (binomial_p_value(k, n, eps) <= delta) == (upper <= eps)
    assert clopper_pearson_upper(0, 25, delta) == pytest.approx(1 - delta ** (1 / 25))
    assert clopper_pearson_upper(5, 5, delta) == 1.0
    assert clopper_pearson_upper(0, 0, delta) == 1.0


# ---- ltt_threshold on hand-worked sets ----------------------------------------------------


def test_hand_worked_walk_skips_small_candidates_and_stops_at_the_first_error():
    # 30 answers scored 0, -0.01, ..., -0.29; only the one at -0.25 is unacceptable. With
    # eps = delta = 0.1, 22 served answers are needed (0.9^22 <= 0.1 < 0.9^21): the top 21
    # candidates are skipped; -0.21..-0.24 are certified (0 errors in 22..25); at -0.25 one
    # error in 26 gives p = 0.9^26 + 26 * 0.1 * 0.9^25 = 0.25 > 0.1 and the walk stops.
    scores = -np.arange(30) / 100
    bad = np.zeros(30, bool)
    bad[25] = True
    r = ltt_threshold(scores, bad, epsilon=0.1, delta=0.1)
    assert r.certified
    assert r.threshold == pytest.approx(-0.24)
    assert (r.n, r.n_served, r.candidates_tested) == (30, 25, 5)
    assert r.student_share == pytest.approx(25 / 30)
    assert r.risk_hat == 0.0
    assert r.p_value == pytest.approx(0.9**25)
    assert r.risk_upper == pytest.approx(1 - 0.1 ** (1 / 25))
    assert r.risk_upper <= r.epsilon


def test_served_risk_never_stops_on_candidates_too_small_to_certify():
    # Without the skip the walk would end at once: the top candidate serves one answer and
    # even with no error its p-value is 0.9 > delta.
    scores = -np.arange(60) / 100
    r = ltt_threshold(scores, np.zeros(60, bool), epsilon=0.1, delta=0.1)
    assert r.certified
    assert r.n_served == 60
    assert r.candidates_tested == 60 - 21


@pytest.mark.parametrize("risk", ["served", "all"])
def test_a_separable_set_with_a_block_of_tied_errors_serves_exactly_the_acceptable_share(risk):
    rng = np.random.default_rng(3)
    good = rng.uniform(-1.0, 0.0, 300)
    scores = np.r_[good, np.full(100, -4.0)]  # the errors all score the same, well below
    bad = np.r_[np.zeros(300, bool), np.ones(100, bool)]
    r = ltt_threshold(scores, bad, epsilon=0.1, delta=0.1, risk=risk)
    assert r.certified
    assert r.threshold == good.min()
    assert r.student_share == pytest.approx(0.75)
    assert r.risk_hat == 0.0


def test_when_one_error_cannot_be_certified_a_separable_set_stops_at_the_class_boundary():
    # eps = 0.05, delta = 0.1: 0 errors in 50 gives 0.95^50 = 0.077 <= 0.1, but 1 in 51 gives
    # 0.27 > 0.1; so the walk must stop exactly after the last acceptable answer.
    rng = np.random.default_rng(4)
    good = rng.uniform(-1.0, 0.0, 50)
    errors = rng.uniform(-3.0, -2.0, 30)
    scores = rng.permutation(np.r_[good, errors])
    bad = scores < -1.5
    r = ltt_threshold(scores, bad, epsilon=0.05, delta=0.1)
    assert r.certified
    assert r.n_served == 50
    assert r.threshold == good.min()


def test_all_unacceptable_certifies_nothing_under_served_risk():
    scores = np.linspace(-2.0, -0.01, 200)
    r = ltt_threshold(scores, np.ones(200, bool), epsilon=0.1, delta=0.1)
    assert not r.certified
    assert r.threshold == 0.0
    assert r.student_share == 0.0 and r.n_served == 0
    assert r.risk_upper == 1.0 and r.p_value == 1.0


def test_all_unacceptable_under_all_risk_serves_less_than_epsilon_of_the_traffic():
    # "all" bounds unacceptable-and-served over all requests: a few bad answers are allowed.
    scores = np.linspace(-2.0, -0.01, 200)
    r = ltt_threshold(scores, np.ones(200, bool), epsilon=0.1, delta=0.1, risk="all")
    assert r.certified
    assert 0 < r.student_share < 0.1
    assert r.risk_hat == r.student_share
    assert r.risk_upper <= 0.1


def test_too_little_data_certifies_nothing():
    r = ltt_threshold(-np.arange(21) / 10, np.zeros(21, bool), epsilon=0.1, delta=0.1)
    assert not r.certified and r.candidates_tested == 0


@pytest.mark.parametrize("risk", ["served", "all"])
def test_minus_infinity_is_never_served(risk):
    scores = np.r_[np.full(50, -np.inf), np.linspace(-1.0, -0.1, 50)]
    r = ltt_threshold(scores, np.zeros(100, bool), epsilon=0.1, delta=0.1, risk=risk)
    assert r.certified
    assert r.n_served == 50 and r.student_share == 0.5
    assert np.isfinite(r.threshold)
    share, risk_value, served = evaluate_threshold(scores, np.ones(100, bool), -np.inf, risk)
    assert (share, served) == (0.5, 50)
    assert risk_value == (1.0 if risk == "served" else 0.5)


def test_candidates_are_thinned_to_scores_from_the_top_down():
    scores = np.random.default_rng(0).normal(size=1000)
    lams = candidate_thresholds(scores, 50)
    assert 2 <= lams.size <= 50
    assert np.all(np.diff(lams) < 0)  # most conservative first
    assert np.isin(lams, scores).all()  # real scores: a candidate serves what the gateway would
    assert lams[0] == scores.max() and lams[-1] == scores.min()
    small = np.array([-1.0, -1.0, -0.5, -np.inf])
    assert candidate_thresholds(small, 50).tolist() == [-0.5, -1.0]


def test_thinning_caps_the_number_of_tests():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-3, 0, 2000)
    r = ltt_threshold(scores, rng.random(2000) < 0.02, epsilon=0.1, delta=0.1, max_candidates=30)
    assert r.candidates_tested <= 30
    assert r.certified


def test_evaluate_threshold_reports_share_risk_and_count_as_the_gateway_would_serve():
    scores = np.array([-0.1, -0.2, -0.3, -0.4])
    bad = np.array([False, True, False, True])
    assert evaluate_threshold(scores, bad, -0.3, "served") == (0.75, 1 / 3, 3)
    assert evaluate_threshold(scores, bad, -0.3, "all") == (0.75, 0.25, 3)
    assert evaluate_threshold(scores, bad, -0.2, "served") == (0.5, 0.5, 2)  # at = served
    assert evaluate_threshold(scores, bad, 0.0, "served") == (0.0, 0.0, 0)


# ---- the guarantee, by simulation ---------------------------------------------------------

_GRID = np.linspace(-3.0, 0.0, 30_001)  # scores ~ U(-3, 0)


def _p_bad(s: np.ndarray) -> np.ndarray:
    # P(unacceptable | score) falls with the score: 0.018 at 0, 0.27 at -1, 0.88 at -2.
    return 1.0 / (1.0 + np.exp(4.0 + 3.0 * s))


_SUFFIX = np.r_[np.cumsum(_p_bad(_GRID)[::-1])[::-1], 0.0]


def _true_risk(threshold: float, risk: str) -> float:
    i = int(np.searchsorted(_GRID, threshold))
    count = _GRID.size - i
    if risk == "served":
        return _SUFFIX[i] / count if count else 0.0
    return _SUFFIX[i] / _GRID.size


def _naive_threshold(scores: np.ndarray, bad: np.ndarray, eps: float, risk: str) -> float:
    """The lowest threshold whose *empirical* risk is <= eps: no guarantee at all."""
    order = np.argsort(-scores)
    errors = np.cumsum(bad[order])
    n = np.arange(1, scores.size + 1) if risk == "served" else scores.size
    ok = np.flatnonzero(errors / n <= eps)
    return float(scores[order][ok[-1]]) if ok.size else 0.0


def _simulate(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-3.0, 0.0, n)
    return scores, rng.random(n) < _p_bad(scores)


def _ideal_share(eps: float, risk: str) -> float:
    """The largest student share whose true risk is <= eps (risk falls as the threshold rises)."""
    lowest = _GRID[np.argmax([_true_risk(t, risk) <= eps for t in _GRID[::30]]) * 30]
    return -lowest / 3.0


@pytest.mark.parametrize(
    ("risk", "eps", "start_errors"), [("served", 0.1, 0), ("served", 0.1, 2), ("all", 0.05, 0)]
)
def test_ltt_keeps_the_true_risk_below_epsilon_with_probability_one_minus_delta(
    risk, eps, start_errors
):
    delta, draws = 0.1, 300
    ltt_violations = naive_violations = 0
    shares = []
    for seed in range(draws):
        scores, bad = _simulate(seed)
        r = ltt_threshold(
            scores, bad, epsilon=eps, delta=delta, risk=risk, start_errors=start_errors
        )
        ltt_violations += r.certified and _true_risk(r.threshold, risk) > eps
        naive_violations += _true_risk(_naive_threshold(scores, bad, eps, risk), risk) > eps
        shares.append(r.student_share)
    # Monte-Carlo slack: the binomial s.d. of the violation rate is ~0.017 at 300 draws.
    assert ltt_violations / draws <= delta + 0.04
    # The check can fail: plugging in the empirical risk violates about half the time.
    assert naive_violations / draws > 0.3
    # And LTT is not trivially safe: it serves a real share on the student.
    assert np.mean(shares) > 0.25 * _ideal_share(eps, risk)


def test_starting_where_an_error_or_two_is_tolerable_serves_more_on_the_student():
    plain, later = [], []
    for seed in range(100):
        scores, bad = _simulate(seed)
        plain.append(ltt_threshold(scores, bad, epsilon=0.1, delta=0.1).student_share)
        r = ltt_threshold(scores, bad, epsilon=0.1, delta=0.1, start_errors=2)
        later.append(r.student_share)
    assert np.median(later) > 1.5 * np.median(plain)


# ---- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "bad", "kwargs", "message"),
    [
        ([-1.0, -2.0], [True], {}, "differ in length"),
        ([-1.0, math.nan], [True, False], {}, "NaN"),
        ([], [], {}, "empty"),
        ([-1.0], [True], {"epsilon": 0.0}, "epsilon must be in (0, 1)"),
        ([-1.0], [True], {"epsilon": 1.0}, "epsilon must be in (0, 1)"),
        ([-1.0], [True], {"delta": 1.5}, "delta must be in (0, 1)"),
        ([-1.0], [True], {"risk": "most"}, "risk must be one of"),
        ([-1.0], [2], {}, "booleans"),
        ([-1.0], [True], {"max_candidates": 0}, "max_candidates"),
        ([-1.0], [True], {"start_errors": -1}, "start_errors"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(scores, bad, kwargs, message):
    args = {"epsilon": 0.1, "delta": 0.1, **kwargs}
    with pytest.raises(ValueError) as err:
        ltt_threshold(scores, bad, **args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_evaluate_threshold_rejects_nan_threshold_and_unknown_risk():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_threshold([-1.0], [True], math.nan)
    with pytest.raises(ValueError, match="risk"):
        evaluate_threshold([-1.0], [True], -1.0, "some")  # type: ignore[arg-type]


def test_routing_curve_rejects_mismatched_qualities_and_too_few_points():
    with pytest.raises(ValueError, match="length"):
        routing_curve([-1.0, -2.0], [1.0, 0.0], teacher_quality=[1.0])
    with pytest.raises(ValueError, match="points"):
        routing_curve([-1.0], [1.0], points=1)


# ---- the routing curve and APGR -----------------------------------------------------------


def test_hand_worked_curve_and_apgr():
    # Scores rank answers 1, 2, 3, 4; the student is right on 1 and 3; the teacher always.
    curve = routing_curve([0.9, 0.8, 0.1, 0.0], [1, 0, 1, 0], points=5)
    np.testing.assert_allclose(curve.share_on_student, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curve.router, [1, 1, 0.75, 0.75, 0.5])
    np.testing.assert_allclose(curve.oracle, [1, 1, 1, 0.75, 0.5])
    np.testing.assert_allclose(curve.random, [1, 0.875, 0.75, 0.625, 0.5])
    measured = apgr(curve)
    # PGR router [1, 1, .5, .5, 0] -> 0.625; oracle [1, 1, 1, .5, 0] -> 0.75 (trapezoids).
    assert (measured.router, measured.random, measured.oracle) == pytest.approx((0.625, 0.5, 0.75))
    assert measured.gain_over_random == pytest.approx(0.5)
    assert measured.note is None


def _world(n: int, seed: int, link: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n)
    good = rng.random(n) < 1.0 / (1.0 + np.exp(-link * scores))
    return scores, good.astype(float)


def test_random_routing_scores_half_and_the_oracle_bounds_every_router():
    scores, quality = _world(2000, 0, 2.0)
    curve = routing_curve(scores, quality)
    measured = apgr(curve)
    assert measured.random == pytest.approx(0.5, abs=1e-12)
    assert measured.oracle >= measured.router > 0.55
    assert np.all(curve.oracle >= curve.router - 1e-12)
    assert np.all(curve.oracle >= curve.random - 1e-12)
    backwards = apgr(routing_curve(-scores, quality))
    assert backwards.router < 0.45  # an anti-correlated router is worse than random


def test_scores_unrelated_to_quality_give_apgr_near_one_half():
    rng = np.random.default_rng(7)
    quality = (rng.random(20_000) < 0.7).astype(float)
    measured = apgr(routing_curve(rng.normal(size=20_000), quality))
    assert measured.router == pytest.approx(0.5, abs=0.02)
    assert abs(measured.gain_over_random) < 0.05


def test_tied_scores_route_like_random():
    _, quality = _world(500, 1, 2.0)
    measured = apgr(routing_curve(np.zeros(500), quality))
    assert measured.router == pytest.approx(0.5, abs=1e-9)


def test_a_perfect_router_is_the_oracle():
    scores, quality = _world(1000, 2, 2.0)
    perfect = quality + 0.01 * scores  # every acceptable answer above every unacceptable one
    curve = routing_curve(perfect, quality)
    np.testing.assert_allclose(curve.router, curve.oracle)
    measured = apgr(curve)
    assert measured.router == pytest.approx(measured.oracle)
    assert measured.gain_over_random == pytest.approx(1.0)


def test_the_oracle_first_takes_items_where_the_student_is_at_least_as_good_as_the_teacher():
    # Judge-graded qualities: on item 0 the student beats the teacher, on item 2 it loses.
    curve = routing_curve([0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.5, 0.5, 1.0], points=4)
    np.testing.assert_allclose(curve.oracle * 3, [2.0, 2.5, 2.5, 1.5])


def test_equal_student_and_teacher_quality_gives_nan_with_a_note_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measured = apgr(routing_curve(np.linspace(-1, 0, 50), np.ones(50)))
    assert math.isnan(measured.router) and math.isnan(measured.oracle)
    assert math.isnan(measured.gain_over_random)
    assert measured.note is not None and "equal" in measured.note


def test_an_oracle_no_better_than_random_leaves_the_normalised_gain_undefined():
    # Every item loses the same to the teacher: all orderings are one straight line.
    measured = apgr(routing_curve(np.linspace(-1, 0, 20), np.full(20, 0.5)))
    assert measured.router == pytest.approx(0.5) and measured.oracle == pytest.approx(0.5)
    assert math.isnan(measured.gain_over_random) and measured.note is not None


def test_curve_rows_hold_every_grid_point():
    rows = routing_curve([-0.1, -0.2], [1, 0], points=11).rows()
    assert len(rows) == 11
    assert set(rows[0]) == {"share_on_student", "router", "random", "oracle"}
    assert rows[0]["router"] == 1.0 and rows[-1]["router"] == 0.5
