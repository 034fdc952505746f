"""The one fallback policy (`FallbackPolicy.decide` and `.score`): a table of decisions, the
threshold's edge, the `hold_tokens` window, the edge policy (disabled, no log-probabilities,
empty, −inf, NaN), the calibrated threshold, and the score calibration uses."""

from __future__ import annotations

import math
from typing import Any

import pytest

from stillhouse.common.config import ConfidenceSettings
from stillhouse.serving.gateway.confidence import SIGNALS, TokenLogprobs, confidence
from stillhouse.serving.gateway.policy import (
    LOW_CONFIDENCE,
    NO_LOGPROBS,
    Decision,
    FallbackPolicy,
    is_low,
)

NEG_INF = -math.inf


def toks(*logprobs: float) -> list[TokenLogprobs]:
    return [TokenLogprobs(lp) for lp in logprobs]


def policy(calibrated: float | None = None, **conf: Any) -> FallbackPolicy:
    """A policy over the whole answer unless `hold_tokens` is given (4096 is the most)."""
    return FallbackPolicy(ConfidenceSettings(**{"hold_tokens": 4096, **conf}), calibrated)


# Sorted logprobs: [-2.0, -0.5, -0.4, -0.1]; mean -0.75.
SAMPLE = toks(-0.1, -0.5, -2.0, -0.4)
UNSURE = toks(-2.0, -2.0, -2.0, -2.0)
SURE = toks(-0.1, -0.1, -0.1, -0.1)
HOLD_2 = {"hold_tokens": 2}
TWO_HALVES = [TokenLogprobs(math.log(0.5), (math.log(0.5), math.log(0.5)))] * 2


@pytest.mark.parametrize(
    ("conf", "calibrated", "tokens", "expected"),
    [
        # Confidence fallback off: always served, nothing scored, whatever the tokens.
        ({"enabled": False}, None, UNSURE, Decision(False, None, None)),
        ({"enabled": False}, None, None, Decision(False, None, None)),
        # No log-probabilities at all: falls back, unscored.
        ({}, None, None, Decision(True, NO_LOGPROBS, None)),
        # No tokens: −inf, falls back even at threshold −inf.
        ({"threshold": NEG_INF}, None, [], Decision(True, LOW_CONFIDENCE, NEG_INF)),
        ({"threshold": -0.5}, None, SURE, Decision(False, None, pytest.approx(-0.1))),
        ({"threshold": -0.5}, None, UNSURE, Decision(True, LOW_CONFIDENCE, -2.0)),
        ({"threshold": -0.75}, None, SAMPLE, Decision(False, None, -0.75)),  # at it: served
        # Only the first `hold_tokens` count.
        (
            {**HOLD_2, "signal": "min_logprob", "threshold": -1.0},
            None,
            toks(-0.1, -0.2, -9.0),
            Decision(False, None, -0.2),
        ),
        # A calibrated threshold replaces the configured one, either way.
        ({"threshold": -0.5}, -3.0, UNSURE, Decision(False, None, -2.0)),
        ({"threshold": -0.5}, -0.05, SURE, Decision(True, LOW_CONFIDENCE, pytest.approx(-0.1))),
        # A certainly-wrong token: −inf under any signal, falls back at threshold −inf.
        (
            {"signal": "quantile", "threshold": NEG_INF},
            None,
            [*toks(-0.1) * 5, TokenLogprobs(NEG_INF), *toks(-0.1) * 5],
            Decision(True, LOW_CONFIDENCE, NEG_INF),
        ),
        (
            {"signal": "neg_mean_entropy", "threshold": -0.5},
            None,
            TWO_HALVES,
            Decision(True, LOW_CONFIDENCE, pytest.approx(-math.log(2))),
        ),
        (
            {"signal": "quantile", "threshold": -1.6},
            None,
            SAMPLE,
            Decision(False, None, pytest.approx(-1.55)),
        ),
    ],
)
def test_decisions(conf, calibrated, tokens, expected):
    decision = policy(calibrated, **conf).decide(tokens)
    assert decision == expected


@pytest.mark.parametrize("signal", SIGNALS)
def test_certain_tokens_give_confidence_zero(signal):
    certain = [TokenLogprobs(0.0, (0.0,)) for _ in range(5)]
    assert confidence(certain, signal) == 0.0
    assert not policy(signal=signal, threshold=0.0).decide(certain).fall_back


@pytest.mark.parametrize(
    ("threshold", "falls_back"),
    [
        (-0.75, False),  # at the threshold the student is served
        (math.nextafter(-0.75, 0.0), True),  # threshold just above the confidence
        (math.nextafter(-0.75, NEG_INF), False),  # threshold just below the confidence
    ],
)
def test_fall_back_iff_confidence_strictly_below_threshold(threshold, falls_back):
    assert confidence(SAMPLE, "mean_logprob") == -0.75
    assert policy(threshold=threshold).decide(SAMPLE).fall_back is falls_back
    assert policy(-0.1, threshold=-0.1).decide(SAMPLE).fall_back  # the calibrated one too
    assert policy(threshold, threshold=-0.1).decide(SAMPLE).fall_back is falls_back


def test_first_n_ignores_later_tokens():
    tokens = toks(-0.1, -0.2, -9.0)
    conf = {"signal": "min_logprob", "threshold": -1.0}
    assert policy(**conf).decide(tokens).fall_back
    assert not policy(**conf, hold_tokens=2).decide(tokens).fall_back
    assert policy(**conf, hold_tokens=3).decide(tokens).fall_back


def test_first_n_longer_than_output_scores_everything():
    assert not policy(threshold=-1.0, hold_tokens=64).decide(toks(-0.1)).fall_back


@pytest.mark.parametrize("first_n", [0, -1])
def test_first_n_below_one_raises(first_n):
    with pytest.raises(ValueError, match="hold_tokens"):
        policy(threshold=-1.0, hold_tokens=first_n)


@pytest.mark.parametrize("signal", SIGNALS)
def test_empty_output_has_no_confidence_and_falls_back(signal):
    assert confidence([], signal) == NEG_INF
    assert policy(signal=signal, threshold=NEG_INF).decide([]).fall_back


@pytest.mark.parametrize("signal", SIGNALS)
def test_certainly_wrong_token_falls_back_under_every_signal_even_at_minus_inf_threshold(signal):
    # 11 tokens, q = 0.1: the bare quantile sits on the 2nd-lowest value and skips the −inf.
    tokens = [TokenLogprobs(-0.1, (0.0,)) for _ in range(10)]
    tokens.insert(1, TokenLogprobs(NEG_INF, (0.0, -0.1)))
    decision = policy(signal=signal, threshold=NEG_INF, quantile=0.1).decide(tokens)
    assert decision == Decision(True, LOW_CONFIDENCE, NEG_INF)


def test_nan_threshold_raises():
    with pytest.raises(ValueError, match="threshold"):
        policy(threshold=math.nan)
    with pytest.raises(ValueError, match="threshold"):
        policy(math.nan)  # a calibrated one


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan])
def test_an_invalid_quantile_never_makes_a_policy(q):
    with pytest.raises(ValueError, match="quantile"):
        policy(quantile=q)


def test_the_threshold_in_force_is_the_calibrated_one_else_the_configured_one():
    assert policy(threshold=-0.5).threshold == -0.5
    assert policy(-0.3, threshold=-0.5).threshold == -0.3
    assert policy(-0.3, threshold=-0.5).calibrated == -0.3


def test_is_low_is_strictly_below_or_minus_infinity():
    assert is_low(-0.6, -0.5) and not is_low(-0.5, -0.5) and is_low(NEG_INF, NEG_INF)


@pytest.mark.parametrize("tokens", [SAMPLE, SURE, UNSURE, toks(-0.3, NEG_INF), []])
def test_the_score_is_the_decisions_score(tokens):
    p = policy(hold_tokens=3)
    assert p.decide(tokens).score == p.score(tokens)


def test_the_score_ignores_whether_fallback_is_enabled():
    off = policy(enabled=False, hold_tokens=2)
    assert off.score(toks(-0.1, -0.3, -9.0)) == pytest.approx(-0.2)
    assert off.score(None) == NEG_INF


def test_calibration_score_uses_the_hold_window_and_no_logprobs_is_minus_infinity():
    # What `stillhouse calibrate` scores each held-out answer with (was `gateway_score`).
    conf = ConfidenceSettings(hold_tokens=2, signal="min_logprob")
    tokens = [TokenLogprobs(-0.1), TokenLogprobs(-0.2), TokenLogprobs(-9.0)]
    assert FallbackPolicy(conf).score(tokens) == -0.2
    assert FallbackPolicy(conf).score(None) == -math.inf
    assert FallbackPolicy(conf).score([]) == -math.inf
