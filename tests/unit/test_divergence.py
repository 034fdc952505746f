"""Divergence estimates from shadow records: k1/k3 on a hand-computed example, their
unbiasedness against exact KL on samples from known distributions, the top-k lower bound
(≤ exact, exact at k = vocab, monotone in k), overlap and top-1 agreement, the edge policy, and
the bootstrap / window / time-bucket aggregates."""

import math

import numpy as np
import pytest

from stillhouse.common.traffic import ShadowRecord
from stillhouse.eval.divergence import (
    LOGPROB_FLOOR,
    RequestDivergence,
    bootstrap_ci,
    bucket_by_time,
    k3_terms,
    request_divergence,
    window_divergence,
)

LN2 = math.log(2)


def record(
    student: list[float],
    teacher: list[float],
    tokens: list[int] | None = None,
    student_top: list[dict[int, float]] | None = None,
    teacher_top: list[dict[int, float]] | None = None,
    ts: float = 0.0,
) -> ShadowRecord:
    return ShadowRecord(
        request_id="r",
        ts=ts,
        student_model="s",
        token_ids=tuple(tokens if tokens is not None else range(len(student))),
        student_logprobs=tuple(student),
        teacher_logprobs=tuple(teacher),
        student_top=None if student_top is None else tuple(student_top),
        teacher_top=None if teacher_top is None else tuple(teacher_top),
    )


def top(logprobs: np.ndarray, k: int) -> dict[int, float]:
    best = np.argsort(-logprobs, kind="stable")[:k]
    return {int(t): float(logprobs[t]) for t in best}


def exact_kl(log_p: np.ndarray, log_q: np.ndarray) -> float:
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def random_log_dist(rng: np.random.Generator, vocab: int, scale: float = 2.0) -> np.ndarray:
    logits = scale * rng.standard_normal(vocab)
    return logits - np.logaddexp.reduce(logits)


def test_k1_and_k3_on_hand_computed_two_token_example():
    # Token 1: p_s = 1/2, p_t = 1/4, so ℓ = ln 2, r = 1/2, k3 = (1/2 − 1) − ln(1/2) = ln 2 − 1/2.
    # Token 2: p_s = 1/4, p_t = 1/2, so ℓ = −ln 2, r = 2, k3 = (2 − 1) − ln 2 = 1 − ln 2.
    # k1: ln 2 − ln 2 = 0; k3 sum: (ln 2 − 1/2) + (1 − ln 2) = 1/2, mean 1/4.
    d = request_divergence(record([-LN2, -2 * LN2], [-2 * LN2, -LN2]))
    assert d.n_tokens == 2
    assert d.k1 == pytest.approx(0.0, abs=1e-15)
    assert d.k1_sum == pytest.approx(0.0, abs=1e-15)
    assert d.k3_sum == pytest.approx(0.5)
    assert d.k3 == pytest.approx(0.25)


def test_k3_is_never_negative_while_k1_tokens_can_be():
    rng = np.random.default_rng(0)
    ratio = rng.normal(0, 3, size=10_000)
    assert (k3_terms(ratio) >= 0).all()
    d = request_divergence(record([-2.0], [-0.5]))  # the teacher likes the token more
    assert d.k1 < 0 < d.k3


def test_k3_stays_accurate_for_tiny_log_ratios():
    # k3 ≈ ℓ²/2 for small ℓ; the textbook (r − 1) − log r cancels to 0 (or noise) here.
    assert k3_terms(np.array([1e-9]))[0] == pytest.approx(5e-19, rel=1e-6)


def test_identical_models_give_zero_divergence_full_overlap_and_agreement():
    rng = np.random.default_rng(1)
    dists = [random_log_dist(rng, 8) for _ in range(3)]
    tokens = [int(np.argmax(d)) for d in dists]
    chosen = [float(d[t]) for d, t in zip(dists, tokens, strict=True)]
    tops = [top(d, 4) for d in dists]
    d = request_divergence(record(chosen, chosen, tokens, tops, tops))
    assert (d.k1, d.k3, d.k1_sum, d.k3_sum) == (0.0, 0.0, 0.0, 0.0)
    assert d.topk_bound == pytest.approx(0.0, abs=1e-12)
    assert d.topk_overlap == 1.0
    assert d.top1_agreement == 1.0


def student_teacher(seed: int, noise: float, vocab: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A student distribution and a teacher whose logits differ from it by `noise`."""
    rng = np.random.default_rng(seed)
    log_p = random_log_dist(rng, vocab)
    log_q = log_p + noise * rng.standard_normal(vocab)
    return log_p, log_q - np.logaddexp.reduce(log_q)


@pytest.mark.parametrize(("seed", "noise"), [(2, 0.3), (3, 0.3), (2, 2.0), (3, 2.0)])
def test_k1_and_k3_means_approach_exact_kl_on_samples_from_the_student(seed, noise):
    log_p, log_q = student_teacher(seed, noise)
    tokens = np.random.default_rng(seed).choice(6, size=200_000, p=np.exp(log_p))
    d = request_divergence(record(log_p[tokens].tolist(), log_q[tokens].tolist(), tokens))
    ratio = log_p[tokens] - log_q[tokens]
    kl = exact_kl(log_p, log_q)
    assert d.k1 == pytest.approx(kl, abs=4 * ratio.std() / math.sqrt(tokens.size))
    assert d.k3 == pytest.approx(kl, abs=4 * k3_terms(ratio).std() / math.sqrt(tokens.size))
    assert d.k1_sum == pytest.approx(d.k1 * tokens.size)
    assert d.k3_sum == pytest.approx(d.k3 * tokens.size)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_k3_has_lower_variance_than_k1_when_the_student_is_close_to_the_teacher(seed):
    # The distillation regime; far apart, r = p_t/p_s has a heavy tail and k3 can be noisier.
    log_p, log_q = student_teacher(seed, 0.1)
    tokens = np.random.default_rng(seed).choice(6, size=20_000, p=np.exp(log_p))
    ratio = log_p[tokens] - log_q[tokens]
    assert k3_terms(ratio).std() < 0.5 * ratio.std()


def test_topk_bound_is_below_exact_kl_grows_with_k_and_is_exact_at_full_vocab():
    rng = np.random.default_rng(4)
    vocab = 20
    students = [random_log_dist(rng, vocab) for _ in range(5)]
    teachers = [s + rng.normal(0, 1.0, vocab) for s in students]
    teachers = [t - np.logaddexp.reduce(t) for t in teachers]
    tokens = [int(rng.choice(vocab, p=np.exp(s))) for s in students]
    exact = np.mean([exact_kl(s, t) for s, t in zip(students, teachers, strict=True)])
    bounds = []
    for k in (1, 3, 5, 10, vocab):
        d = request_divergence(
            record(
                [float(s[t]) for s, t in zip(students, tokens, strict=True)],
                [float(q[t]) for q, t in zip(teachers, tokens, strict=True)],
                tokens,
                [top(s, k) for s in students],
                [top(q, k) for q in teachers],
            )
        )
        assert d.topk_bound <= exact + 1e-12
        bounds.append(d.topk_bound)
    assert bounds == sorted(bounds)  # nested top-k sets: a finer partition never loses KL
    assert bounds[-1] == pytest.approx(exact, rel=1e-9)
    assert bounds[0] < 0.9 * exact  # and the coarse end is genuinely a bound, not exact


def test_topk_overlap_is_shared_tokens_over_the_shorter_list():
    s_top = {1: -0.5, 2: -1.5, 3: -2.5}
    t_top = {2: -0.7, 3: -1.0, 4: -2.0, 5: -3.0}
    d = request_divergence(record([-0.5], [-3.0], [1], [s_top], [t_top]))
    assert d.topk_overlap == pytest.approx(2 / 3)


def test_top1_agreement_uses_the_student_top_when_present_else_its_sampled_token():
    t_tops = [{7: -0.1, 8: -3.0}, {9: -0.2, 7: -2.0}]
    s_tops = [{7: -0.3, 8: -1.5}, {7: -0.4, 9: -1.2}]  # argmax 7 and 7: agrees at position 0
    with_top = request_divergence(record([-1.5, -1.2], [-3.0, -0.2], [8, 9], s_tops, t_tops))
    assert with_top.top1_agreement == 0.5
    # Without the student's top-k its sampled tokens (8, 9) stand in: agrees at position 1.
    sampled = request_divergence(record([-1.5, -1.2], [-3.0, -0.2], [8, 9], None, t_tops))
    assert sampled.top1_agreement == 0.5
    assert sampled.topk_bound is None and sampled.topk_overlap is None
    greedy = request_divergence(record([-0.3, -1.2], [-0.1, -0.2], [7, 9], None, t_tops))
    assert greedy.top1_agreement == 1.0


def test_top_statistics_are_none_without_the_teacher_top():
    d = request_divergence(record([-0.1], [-0.2], [1], [{1: -0.1}], None))
    assert (d.topk_bound, d.topk_overlap, d.top1_agreement) == (None, None, None)


def test_neg_inf_teacher_logprob_is_floored_to_a_large_finite_divergence():
    d = request_divergence(record([-0.1], [-math.inf]))
    assert d.k1 == pytest.approx(-0.1 - LOGPROB_FLOOR)
    assert math.isfinite(d.k3) and d.k3 > 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"student": [], "teacher": []}, "no tokens"),
        ({"student": [-0.1, float("nan")], "teacher": [-0.1, -0.2]}, "NaN"),
        ({"student": [-0.1, -0.2], "teacher": [-0.1]}, "same tokens"),
        ({"student": [-0.1], "teacher": [-0.1], "tokens": [1, 2]}, "token ids"),
        ({"student": [0.5], "teacher": [-0.1]}, "> 0"),
        ({"student": [-0.1], "teacher": [-0.1], "teacher_top": []}, "teacher_top has 0"),
        ({"student": [-0.1], "teacher": [-0.1], "teacher_top": [{}]}, "empty"),
        (
            {"student": [-0.1], "teacher": [-0.1], "teacher_top": [{0: -0.1}],
             "student_top": [{0: float("nan")}]},
            "invalid log-prob",
        ),
    ],
)  # fmt: skip
def test_malformed_records_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        request_divergence(record(**kwargs))


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(5)
    widths = []
    for n in (50, 500, 5000):
        values = rng.exponential(1.0, size=n)
        lo, hi = bootstrap_ci(values, seed=1)
        assert lo < values.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~ 1/sqrt(n): √10 per step


def test_bootstrap_ci_is_reproducible_from_its_seed_and_takes_other_statistics():
    values = np.random.default_rng(6).normal(size=200)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    lo, hi = bootstrap_ci(values, np.median, confidence=0.5, resamples=400)
    assert lo <= np.median(values) <= hi


@pytest.mark.parametrize(
    ("values", "kwargs"),
    [([], {}), ([1.0, float("nan")], {}), ([1.0], {"confidence": 1.0}), ([1.0], {"resamples": 0})],
)
def test_bootstrap_ci_rejects_bad_input(values, kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(values, **kwargs)


def divergence(k1: float, k3: float, ts: float = 0.0, n: int = 10, **extra) -> RequestDivergence:
    return RequestDivergence("r", ts, "s", n, k1, k3, k1 * n, k3 * n, **extra)


def test_window_divergence_weighs_requests_equally_and_averages_present_top_stats():
    items = [
        divergence(0.1, 0.2, n=5, top1_agreement=1.0, topk_bound=0.1, topk_overlap=0.8),
        divergence(0.3, 0.4, n=50, top1_agreement=0.5),
        divergence(0.2, 0.3, n=1),
    ]
    w = window_divergence(items, resamples=200)
    assert (w.n, w.n_tokens) == (3, 56)
    assert w.k1_mean == pytest.approx(0.2) and w.k3_mean == pytest.approx(0.3)
    assert w.k1_ci[0] <= 0.2 <= w.k1_ci[1] and w.k3_ci[0] <= 0.3 <= w.k3_ci[1]
    assert w.top1_agreement == pytest.approx(0.75)
    assert (w.topk_bound, w.topk_overlap) == (0.1, 0.8)
    bare = window_divergence([divergence(0.1, 0.1)], resamples=10)
    assert (bare.top1_agreement, bare.topk_bound, bare.k3_ci) == (None, None, (0.1, 0.1))
    with pytest.raises(ValueError, match="at least one"):
        window_divergence([])


def test_bucket_by_time_aligns_buckets_to_the_epoch_and_skips_empty_ones():
    items = [divergence(0.1, 0.1, ts=t) for t in (125.0, 61.0, 179.9, 300.0)]
    buckets = bucket_by_time(items, 60.0, resamples=10)
    assert [(start, w.n) for start, w in buckets] == [(60.0, 1), (120.0, 2), (300.0, 1)]
    with pytest.raises(ValueError, match="positive"):
        bucket_by_time(items, 0.0)
