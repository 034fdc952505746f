"""Student confidence from its own token logprobs: each signal on hand-computed examples, the
entropy lower-bound claim, and the edge cases of the signals (empty input, −inf, NaN, bad
quantile, unknown signal). The fall-back decision on top of them: test_fallback_policy.py."""

import math
import random

import pytest

from stillhouse.serving.gateway.confidence import (
    TokenLogprobs,
    confidence,
    mean_logprob,
    min_logprob,
    neg_mean_entropy,
    quantile_logprob,
    topk_entropy,
)

LN2 = math.log(2)
NEG_INF = -math.inf


def toks(*logprobs: float) -> list[TokenLogprobs]:
    return [TokenLogprobs(lp) for lp in logprobs]


# Sorted logprobs: [-2.0, -0.5, -0.4, -0.1]; mean -0.75.
SAMPLE = toks(-0.1, -0.5, -2.0, -0.4)


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        ("mean_logprob", -0.75),
        ("min_logprob", -2.0),
        ("quantile", -1.55),  # position 0.1·3 = 0.3: -2.0 + 0.3·(−0.5 − −2.0)
    ],
)
def test_logprob_signals_on_hand_computed_example(signal, expected):
    assert confidence(SAMPLE, signal) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.0, -2.0), (0.1, -1.55), (0.5, -0.45), (2 / 3, -0.2 - 0.2), (1.0, -0.1)],
)
def test_quantile_interpolates_linearly_between_order_statistics(q, expected):
    assert quantile_logprob(SAMPLE, q) == pytest.approx(expected)


def test_quantile_matches_numpy_default_method():
    import numpy as np  # a declared dependency: no skip

    rng = random.Random(7)
    values = [-rng.expovariate(1.0) for _ in range(13)]
    for q in (0.0, 0.05, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert quantile_logprob(toks(*values), q) == pytest.approx(float(np.quantile(values, q)))


def test_single_token_quantile_is_that_token():
    assert quantile_logprob(toks(-0.3), 0.1) == pytest.approx(-0.3)


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ((0.0,), 0.0),  # one certain token
        ((math.log(0.5), math.log(0.5)), LN2),
        ((math.log(0.25), math.log(0.25)), LN2),  # renormalised: only the ratios matter
        ((math.log(0.5), math.log(0.25), math.log(0.25)), 1.5 * LN2),
        ((math.log(0.5), math.log(0.5), NEG_INF), LN2),  # probability 0 contributes nothing
        ((-1000.0, -1000.0), LN2),  # far-negative logits do not underflow
    ],
)
def test_topk_entropy_on_hand_computed_distributions(top, expected):
    assert topk_entropy(top) == pytest.approx(expected, abs=1e-12)


def test_neg_mean_entropy_averages_per_token_entropies():
    tokens = [
        TokenLogprobs(math.log(0.5), (math.log(0.5), math.log(0.5))),
        TokenLogprobs(math.log(0.5), (math.log(0.5), math.log(0.25), math.log(0.25))),
    ]
    assert neg_mean_entropy(tokens) == pytest.approx(-1.25 * LN2)
    assert confidence(tokens, "neg_mean_entropy") == pytest.approx(-1.25 * LN2)


def _entropy(p: list[float]) -> float:
    return -math.fsum(x * math.log(x) for x in p if x > 0)


def test_topk_entropy_is_a_lower_bound_of_full_entropy_for_the_top_k():
    rng = random.Random(0)
    for _ in range(2000):
        vocab = rng.randint(2, 12)
        weights = [rng.expovariate(1.0) ** rng.choice([1, 3, 8]) for _ in range(vocab)]
        total = sum(weights)
        p = sorted((w / total for w in weights), reverse=True)
        k = rng.randint(1, vocab)
        h_topk = topk_entropy([math.log(x) for x in p[:k]])
        m = sum(p[:k])
        # The documented gap: H_full − H_topk ≥ −(1 − m)·ln m ≥ 0.
        assert _entropy(p) - h_topk >= -(1 - m) * math.log(m) - 1e-12


def test_topk_entropy_is_not_a_bound_for_an_arbitrary_subset():
    p = [0.98, 0.01, 0.01]
    assert topk_entropy([math.log(0.01), math.log(0.01)]) > _entropy(p)


def test_quantile_with_minus_inf_neighbour_is_minus_inf_not_nan():
    tokens = toks(NEG_INF, -1.0)
    assert quantile_logprob(tokens, 0.5) == NEG_INF
    assert quantile_logprob(tokens, 1.0) == -1.0


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan])
def test_invalid_quantile_raises(q):
    with pytest.raises(ValueError, match="quantile"):
        quantile_logprob(SAMPLE, q)
    with pytest.raises(ValueError, match="quantile"):
        confidence(SAMPLE, "quantile", quantile=q)


def test_unknown_signal_raises():
    with pytest.raises(ValueError, match="unknown confidence signal"):
        confidence(SAMPLE, "perplexity")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("logprob", "top"),
    [(math.nan, ()), (math.inf, ()), (-0.1, (math.nan,)), (-0.1, (0.0, math.inf))],
)
def test_nan_and_plus_inf_logprobs_are_rejected(logprob, top):
    with pytest.raises(ValueError, match="logprob"):
        TokenLogprobs(logprob, top)


def test_all_minus_inf_top_is_rejected():
    with pytest.raises(ValueError, match="all -inf"):
        TokenLogprobs(-0.1, (NEG_INF, NEG_INF))


def test_entropy_signal_requires_top_logprobs():
    with pytest.raises(ValueError, match="top_logprobs"):
        confidence(toks(-0.1), "neg_mean_entropy")


def test_top_is_stored_as_a_tuple_of_floats():
    token = TokenLogprobs(-0.1, [0, -1])  # type: ignore[arg-type]
    assert token.top == (0.0, -1.0)
    assert mean_logprob([token]) == min_logprob([token]) == -0.1
