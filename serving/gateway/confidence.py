"""How confident a student is in its own answer: signals over its token log-probabilities.

    confidence(tokens, "mean_logprob")     # higher is more confident; <= 0 for sane input

Signals: `mean_logprob`, `min_logprob`, `quantile` (`quantile_logprob`, numpy's default
interpolation) and `neg_mean_entropy` (minus the mean top-k entropy, `topk_entropy`). No tokens,
or any −inf chosen-token logprob, is −inf under every signal; NaN and +inf are rejected when a
`TokenLogprobs` is built. Whether that score means a fallback is `policy.FallbackPolicy`'s call;
docs/gateway.md has the whole edge policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Signal = Literal["mean_logprob", "min_logprob", "quantile", "neg_mean_entropy"]
SIGNALS: tuple[Signal, ...] = ("mean_logprob", "min_logprob", "quantile", "neg_mean_entropy")


def _check_logprob(value: float, what: str) -> None:
    if math.isnan(value) or value == math.inf:
        raise ValueError(f"{what} must be a finite number or -inf, got {value!r}")


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated position: the chosen token's logprob and the top-k logprobs there.

    `top` may be empty when the request asked for no `top_logprobs` (then only the logprob
    signals work). NaN and +inf are rejected; −inf means probability 0. When `top` is non-empty
    at least one entry must be finite, or there is no distribution to renormalise.
    """

    logprob: float
    top: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "top", tuple(float(x) for x in self.top))
        _check_logprob(self.logprob, "logprob")
        for x in self.top:
            _check_logprob(x, "top logprob")
        if self.top and all(x == -math.inf for x in self.top):
            raise ValueError("top logprobs are all -inf: no distribution to renormalise")


def _check_quantile(q: float) -> None:
    if math.isnan(q) or not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q!r}")


def mean_logprob(tokens: Sequence[TokenLogprobs]) -> float:
    """The mean chosen-token logprob; −inf for no tokens or if any token has logprob −inf."""
    if not tokens:
        return -math.inf
    return math.fsum(t.logprob for t in tokens) / len(tokens)


def min_logprob(tokens: Sequence[TokenLogprobs]) -> float:
    """The lowest chosen-token logprob; −inf for no tokens."""
    if not tokens:
        return -math.inf
    return min(t.logprob for t in tokens)


def quantile_logprob(tokens: Sequence[TokenLogprobs], q: float) -> float:
    """The q-quantile of the chosen-token logprobs, interpolated linearly between order
    statistics like numpy's default: position q·(n−1) in the sorted values. −inf for no tokens.

    A −inf neighbour with non-zero weight gives −inf (plain interpolation would give NaN from
    −inf + inf·0). `q` outside [0, 1] raises `ValueError`.
    """
    _check_quantile(q)
    if not tokens:
        return -math.inf
    xs = sorted(t.logprob for t in tokens)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    frac = pos - lo
    if frac == 0.0:
        return xs[lo]
    a, b = xs[lo], xs[lo + 1]
    if a == -math.inf:
        return -math.inf
    return a + (b - a) * frac


def topk_entropy(top: Sequence[float]) -> float:
    """Entropy (nats) of the distribution `top` defines once renormalised over its k entries.

    With m = Σ exp(top) the listed mass, grouping gives for the full-vocabulary entropy

        H_full = H_b(m) + m·H_topk + (1 − m)·H_rest,

    where H_b is the binary entropy and H_rest the entropy of the unlisted tokens renormalised.
    If the entries are the k *most probable* tokens (what `top_logprobs` returns), then
    H_topk ≤ H_full: each unlisted token has probability ≤ m/k, so H_rest ≥ ln((1 − m)k/m), and
    with H_topk ≤ ln k and H_b(m) ≥ −(1 − m)ln(1 − m) the gap is H_full − H_topk ≥ −(1 − m)ln m
    ≥ 0. So it is a lower bound, strict unless m = 1 (no mass outside the top k). The proof
    needs the entries to be the top k; for an arbitrary subset of tokens it fails: with
    p = (0.98, 0.01, 0.01), the subset {0.01, 0.01} has H = ln 2 ≈ 0.69 > H_full ≈ 0.11. The
    bound is about whichever distribution the logprobs came from (e.g. before/after temperature).

    −inf entries have probability 0 and contribute nothing; k = 1 gives 0.
    """
    if not top:
        raise ValueError("the entropy signal needs top-k logprobs (request top_logprobs >= 1)")
    finite = [x for x in top if x != -math.inf]
    if not finite:
        raise ValueError("top logprobs are all -inf: no distribution to renormalise")
    shift = max(finite)
    weights = [math.exp(x - shift) for x in finite]
    total = math.fsum(weights)
    log_z = shift + math.log(total)
    # H = log Z − Σ p_i·l_i with p_i = exp(l_i − log Z); never negative, clamp rounding.
    return max(0.0, log_z - math.fsum(w / total * x for w, x in zip(weights, finite, strict=True)))


def neg_mean_entropy(tokens: Sequence[TokenLogprobs]) -> float:
    """Minus the mean over tokens of `topk_entropy(token.top)`; −inf for no tokens.

    Raises `ValueError` if a token has no top-k logprobs.
    """
    if not tokens:
        return -math.inf
    return -math.fsum(topk_entropy(t.top) for t in tokens) / len(tokens)


def confidence(tokens: Sequence[TokenLogprobs], signal: Signal, quantile: float = 0.1) -> float:
    """The student's confidence in `tokens` under `signal` (higher = more confident).

    Any token with logprob −inf (certainly wrong) gives −inf whatever the signal, overriding
    the signal functions (a bare `quantile_logprob` can step over one). `quantile` is used by
    the `"quantile"` signal but validated always, so a bad config fails at the first request
    whatever the signal. An unknown signal raises `ValueError`.
    """
    _check_quantile(quantile)
    if signal not in SIGNALS:
        raise ValueError(f"unknown confidence signal {signal!r}; expected one of {SIGNALS}")
    if any(t.logprob == -math.inf for t in tokens):
        return -math.inf
    if signal == "mean_logprob":
        return mean_logprob(tokens)
    if signal == "min_logprob":
        return min_logprob(tokens)
    if signal == "quantile":
        return quantile_logprob(tokens, quantile)
    return neg_mean_entropy(tokens)
