"""Student–teacher divergence from shadow records: per-request KL estimates (k1, k3), a top-k
lower bound, top-1 agreement, and window aggregates with bootstrap confidence intervals.

    per_request = [request_divergence(r) for r in log.shadow(since=t0)]
    summary = window_divergence(per_request)   # means with 95 % bootstrap intervals

Estimates are on the student's own tokens (Schulman's k1 and k3); corrupt records raise
`ValueError`, a −inf log-prob is floored at `LOGPROB_FLOOR`. Why, and the edge policy in
full: docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stillhouse.common.traffic import ShadowRecord

LOGPROB_FLOOR = -100.0
"""−inf (and anything lower) is read as this: about float32's smallest log-softmax output."""
REST_EPS = 1e-12
"""Smallest mass given to the "rest" bucket of the top-k bound, so the log stays finite."""
_POSITIVE_TOLERANCE = 1e-3  # log-probs up to this far above 0 are rounding; beyond is corrupt

Top = Mapping[int, float]


@dataclass(frozen=True, slots=True)
class RequestDivergence:
    """Divergence of one shadowed answer. k1/k3 are per-token means, *_sum sequence sums.

    `topk_bound` (a lower bound on the per-token KL) and `topk_overlap` need both top-k lists;
    `top1_agreement` needs the teacher's. Each is None when its input is missing.
    """

    request_id: str
    ts: float
    student_model: str | None
    n_tokens: int
    k1: float
    k3: float
    k1_sum: float
    k3_sum: float
    topk_bound: float | None = None
    topk_overlap: float | None = None
    top1_agreement: float | None = None


def _logprobs(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of log-probs, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"{what} contains NaN")
    if (x > _POSITIVE_TOLERANCE).any():
        raise ValueError(f"{what} contains a log-prob > 0 (max {x.max():g}): not a log-prob")
    return np.clip(x, LOGPROB_FLOOR, 0.0)


def log_ratios(
    student_logprobs: Sequence[float] | np.ndarray, teacher_logprobs: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Validated per-token ``lp_s − lp_t`` (see the module docstring for the edge policy)."""
    s = _logprobs(student_logprobs, "student_logprobs")
    t = _logprobs(teacher_logprobs, "teacher_logprobs")
    if s.shape != t.shape:
        raise ValueError(
            f"student_logprobs has {s.size} tokens but teacher_logprobs has {t.size}: "
            "the two sides must score the same tokens"
        )
    if s.size == 0:
        raise ValueError("no tokens: divergence of an empty answer is undefined")
    return s - t


def k3_terms(log_ratio: np.ndarray) -> np.ndarray:
    """Per-token k3 from ``ℓ = lp_s − lp_t``: ``(r − 1) − log r`` with ``r = e^{−ℓ}``.

    Written as ``expm1(−ℓ) + ℓ`` so it stays accurate (and ≥ 0) when ℓ is tiny, where the
    textbook form cancels catastrophically. Works elementwise on any shape (the simulator
    calls it on whole batches)."""
    return np.maximum(np.expm1(-log_ratio) + log_ratio, 0.0)


def _top(top: Top, what: str) -> dict[int, float]:
    if not top:
        raise ValueError(f"{what} is empty: a present top-k list needs at least one entry")
    out = {}
    for token, lp in top.items():
        if math.isnan(lp) or lp > _POSITIVE_TOLERANCE:
            raise ValueError(f"{what} has an invalid log-prob {lp!r} for token {token}")
        out[int(token)] = min(max(lp, LOGPROB_FLOOR), 0.0)
    return out


def _argmax(top: Mapping[int, float]) -> int:
    # Highest log-prob; ties go to the smallest token id, so the result never depends on order.
    return min(top, key=lambda token: (-top[token], token))


def _position_bound(
    s_top: Mapping[int, float], t_top: Mapping[int, float], token: int, lp_s: float, lp_t: float
) -> float:
    """KL of the two distributions coarse-grained onto S ∪ {rest}.

    S is the tokens in both top-k lists plus the sampled token (whose probability both sides
    report even when it is outside a top-k list). Merging outcomes never increases KL (data
    processing inequality), so this is a lower bound on the full-vocabulary KL at this
    position, and equal to it when S is the whole vocabulary. The rest masses are clamped to
    ≥ REST_EPS: rounding can push Σ_S above 1.
    """
    known = {tok: (s_top[tok], t_top[tok]) for tok in s_top.keys() & t_top.keys()}
    known.setdefault(token, (lp_s, lp_t))
    kl = mass_s = mass_t = 0.0
    for ls, lt in known.values():
        ps = math.exp(ls)
        kl += ps * (ls - lt)
        mass_s += ps
        mass_t += math.exp(lt)
    rest_s, rest_t = max(1.0 - mass_s, REST_EPS), max(1.0 - mass_t, REST_EPS)
    kl += rest_s * math.log(rest_s / rest_t)
    return max(kl, 0.0)


def _top_stats(record: ShadowRecord, n: int) -> tuple[float | None, float | None, float | None]:
    """(top-k bound, top-k overlap, top-1 agreement), each None when its input is missing."""
    if record.teacher_top is None:
        return None, None, None
    if len(record.teacher_top) != n:
        raise ValueError(f"teacher_top has {len(record.teacher_top)} positions, answer has {n}")
    t_tops = [_top(t, f"teacher_top[{i}]") for i, t in enumerate(record.teacher_top)]
    if record.student_top is None:
        # Without the student's top-k, its sampled token stands in for its top-1: exact under
        # greedy decoding (the sampled token is the argmax), an underestimate of agreement
        # under temperature sampling. No bound or overlap: they need both distributions.
        agree = [tok == _argmax(t) for tok, t in zip(record.token_ids, t_tops, strict=True)]
        return None, None, float(np.mean(agree))
    if len(record.student_top) != n:
        raise ValueError(f"student_top has {len(record.student_top)} positions, answer has {n}")
    s_tops = [_top(s, f"student_top[{i}]") for i, s in enumerate(record.student_top)]
    bounds, overlaps, agree = [], [], []
    for i, (s_top, t_top) in enumerate(zip(s_tops, t_tops, strict=True)):
        lp_s = min(max(record.student_logprobs[i], LOGPROB_FLOOR), 0.0)
        lp_t = min(max(record.teacher_logprobs[i], LOGPROB_FLOOR), 0.0)
        bounds.append(_position_bound(s_top, t_top, record.token_ids[i], lp_s, lp_t))
        # k is the shorter list: the largest overlap possible, so identical models give 1.
        overlaps.append(len(s_top.keys() & t_top.keys()) / min(len(s_top), len(t_top)))
        agree.append(_argmax(s_top) == _argmax(t_top))
    return float(np.mean(bounds)), float(np.mean(overlaps)), float(np.mean(agree))


def request_divergence(record: ShadowRecord) -> RequestDivergence:
    """Divergence estimates for one shadow record; `ValueError` on a malformed record."""
    ratio = log_ratios(record.student_logprobs, record.teacher_logprobs)
    n = ratio.size
    if len(record.token_ids) != n:
        raise ValueError(f"record has {len(record.token_ids)} token ids but {n} log-probs")
    k3 = k3_terms(ratio)
    bound, overlap, top1 = _top_stats(record, n)
    return RequestDivergence(
        request_id=record.request_id,
        ts=record.ts,
        student_model=record.student_model,
        n_tokens=n,
        k1=float(ratio.mean()),
        k3=float(k3.mean()),
        k1_sum=float(ratio.sum()),
        k3_sum=float(k3.sum()),
        topk_bound=bound,
        topk_overlap=overlap,
        top1_agreement=top1,
    )


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[..., np.ndarray] = np.mean,
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `stat` over `values`.

    `stat` must reduce along an ``axis`` keyword like the numpy reductions (np.mean,
    np.median, ...): resamples are drawn as one index matrix and reduced row-wise, in chunks
    of about 4M elements so a large window does not allocate resamples × n at once. Seeded,
    so the same data always give the same interval. Percentile intervals need no normality,
    which matters here: per-request KL is skewed to the right.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap needs a non-empty flat sequence, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap values must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    rng = np.random.default_rng(seed)
    n = x.size
    stats = np.empty(resamples)
    chunk = max(1, (1 << 22) // n)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        stats[start:stop] = stat(x[rng.integers(0, n, size=(stop - start, n))], axis=1)
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True, slots=True)
class WindowDivergence:
    """Divergence over a window of requests; each request weighs the same (the unit of
    traffic, and of drift detection), so one very long answer cannot dominate the mean.

    The top-k and top-1 means cover only the requests that have them (None if none do)."""

    n: int
    n_tokens: int
    k1_mean: float
    k1_ci: tuple[float, float]
    k3_mean: float
    k3_ci: tuple[float, float]
    top1_agreement: float | None
    topk_bound: float | None
    topk_overlap: float | None
    confidence: float


def _mean_of_present(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def window_divergence(
    items: Sequence[RequestDivergence],
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> WindowDivergence:
    """Mean k1 and k3 with percentile-bootstrap intervals, plus top-k/top-1 means."""
    if not items:
        raise ValueError("window_divergence needs at least one request")
    k1 = np.array([d.k1 for d in items])
    k3 = np.array([d.k3 for d in items])
    ci = {"confidence": confidence, "resamples": resamples, "seed": seed}
    return WindowDivergence(
        n=len(items),
        n_tokens=sum(d.n_tokens for d in items),
        k1_mean=float(k1.mean()),
        k1_ci=bootstrap_ci(k1, **ci),
        k3_mean=float(k3.mean()),
        k3_ci=bootstrap_ci(k3, **ci),
        top1_agreement=_mean_of_present([d.top1_agreement for d in items]),
        topk_bound=_mean_of_present([d.topk_bound for d in items]),
        topk_overlap=_mean_of_present([d.topk_overlap for d in items]),
        confidence=confidence,
    )


def bucket_by_time(
    items: Sequence[RequestDivergence],
    seconds: float,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> list[tuple[float, WindowDivergence]]:
    """(bucket start, window summary) per non-empty time bucket, oldest first: "divergence
    over time". Buckets are aligned to multiples of `seconds` since the epoch, so plots of
    different runs line up; empty buckets are left out rather than given a fake zero."""
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"bucket width must be a positive number of seconds, got {seconds!r}")
    buckets: dict[float, list[RequestDivergence]] = {}
    for item in items:
        buckets.setdefault(math.floor(item.ts / seconds) * seconds, []).append(item)
    return [
        (start, window_divergence(buckets[start], confidence, resamples, seed))
        for start in sorted(buckets)
    ]
