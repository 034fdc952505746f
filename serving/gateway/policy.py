"""The fallback policy: whether the teacher answers instead of a student, from its tokens.

    policy = FallbackPolicy(settings.gateway.confidence, calibrated_threshold_or_none)
    decision = policy.decide(tokens)   # .fall_back, .reason (no_logprobs | low_confidence), .score
    policy.score(tokens)               # the confidence alone (calibration scores with it)

One rule for every caller: the gateway's non-streamed and streamed paths and the mirror (through
`student.StudentStep`) and `stillhouse calibrate`. The signals themselves are in `confidence.py`;
the edge policy (disabled, no log-probabilities, −inf, the `hold_tokens` window) is in
docs/gateway.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from stillhouse.common.config import ConfidenceSettings
from stillhouse.serving.gateway.confidence import Signal, TokenLogprobs, confidence

NO_LOGPROBS = "no_logprobs"
LOW_CONFIDENCE = "low_confidence"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one answer."""

    fall_back: bool
    reason: str | None  # NO_LOGPROBS | LOW_CONFIDENCE | None (served)
    score: float | None  # the confidence; None when nothing was scored


# The two decisions that carry no score, built once (no allocation per request).
UNSCORED = Decision(False, None, None)  # confidence fallback is off: the student is served
WITHOUT_LOGPROBS = Decision(True, NO_LOGPROBS, None)


def is_low(score: float, threshold: float) -> bool:
    """The rule on a computed score: strictly below the threshold, or −inf (so no tokens, or a
    certainly-wrong token, falls back even with threshold −inf)."""
    return score == -math.inf or score < threshold


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """The confidence rule for one engine: `settings` (signal, window, threshold, on/off) and
    the threshold calibrated for the version it serves (None: the configured one).

    Raises `ValueError` for a NaN threshold; `ConfidenceSettings` validates the rest.
    """

    settings: ConfidenceSettings
    calibrated: float | None = None
    threshold: float = field(init=False)  # the one in force
    # Copied out of `settings` once: `decide` runs on every student answer.
    _enabled: bool = field(init=False, repr=False)
    _signal: Signal = field(init=False, repr=False)
    _quantile: float = field(init=False, repr=False)
    _hold: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = self.settings
        threshold = s.threshold if self.calibrated is None else self.calibrated
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "_enabled", s.enabled)
        object.__setattr__(self, "_signal", s.signal)
        object.__setattr__(self, "_quantile", s.quantile)
        object.__setattr__(self, "_hold", s.hold_tokens)

    def score(self, tokens: Sequence[TokenLogprobs] | None) -> float:
        """The confidence over the first `hold_tokens` tokens; −inf without log-probabilities
        (such an answer is never served). Whether the rule is enabled does not matter here."""
        if tokens is None:
            return -math.inf
        return confidence(tokens[: self._hold], self._signal, self._quantile)

    def decide(self, tokens: Sequence[TokenLogprobs] | None) -> Decision:
        """`tokens`: the answer's per-token log-probabilities (all of them, or at least the
        first `hold_tokens`); None when the engine sent none."""
        if not self._enabled:
            return UNSCORED
        if tokens is None:
            return WITHOUT_LOGPROBS
        score = confidence(tokens[: self._hold], self._signal, self._quantile)
        if is_low(score, self.threshold):
            return Decision(True, LOW_CONFIDENCE, score)
        return Decision(False, None, score)
