"""The calibrated fallback threshold as registry version tags: written by the calibration job
(`rollout`), read by the gateway (`serving`), so both share these keys and this parser.

    stillhouse.calibration.threshold    "-0.412"   the confidence threshold (a float, <= 0)
    stillhouse.calibration.certified    "true"     false: no threshold met the risk bound
    stillhouse.calibration.signal       "mean_logprob"   the confidence signal it was fit for
    stillhouse.calibration.hold_tokens  "8"        over how many first tokens it was scored
    stillhouse.calibration.quantile     "0.1"      (only for the `quantile` signal; optional)

A threshold is only meaningful for the signal and hold length it was calibrated with: a gateway
configured otherwise keeps its configured threshold, and says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

CALIBRATION_TAG_PREFIX = "stillhouse.calibration."
THRESHOLD_TAG = CALIBRATION_TAG_PREFIX + "threshold"
CERTIFIED_TAG = CALIBRATION_TAG_PREFIX + "certified"
SIGNAL_TAG = CALIBRATION_TAG_PREFIX + "signal"
HOLD_TOKENS_TAG = CALIBRATION_TAG_PREFIX + "hold_tokens"
QUANTILE_TAG = CALIBRATION_TAG_PREFIX + "quantile"
TOP_K_TAG = CALIBRATION_TAG_PREFIX + "top_k"

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def calibration_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Only the calibration tags (what decides the threshold), e.g. to notice a change."""
    return {k: str(v) for k, v in tags.items() if k.startswith(CALIBRATION_TAG_PREFIX)}


def fit_problem(
    tags: Mapping[str, str],
    signal: str,
    hold_tokens: int,
    quantile: float | None = None,
    top_k: int | None = None,
) -> str | None:
    """Why a calibration does not fit a gateway scoring with `signal` over `hold_tokens`
    tokens (and `quantile`, or the top-`top_k` entropy, where the signal uses them); None when
    it fits. The one check both the gateway and the rollout controller apply."""
    fit_signal = tags.get(SIGNAL_TAG)
    if fit_signal is None or tags.get(HOLD_TOKENS_TAG) is None:
        return "calibration tags do not say which signal and hold_tokens they fit"
    if fit_signal != signal:
        return f"calibrated for signal {fit_signal}, the gateway uses {signal}"
    try:
        fit_hold = int(tags[HOLD_TOKENS_TAG])
    except ValueError:
        return f"unreadable hold_tokens tag {tags[HOLD_TOKENS_TAG]!r}"
    if fit_hold != hold_tokens:
        return f"calibrated over {fit_hold} tokens, the gateway holds {hold_tokens}"
    if signal == "quantile" and quantile is not None and QUANTILE_TAG in tags:
        try:
            fit_q = float(tags[QUANTILE_TAG])
        except ValueError:
            return f"unreadable quantile tag {tags[QUANTILE_TAG]!r}"
        if not math.isclose(fit_q, quantile, rel_tol=1e-9, abs_tol=1e-12):
            return f"calibrated for quantile {fit_q}, the gateway uses {quantile}"
    # The top-k entropy changes with k: a threshold fit on another k means nothing here.
    fit_k = tags.get(TOP_K_TAG)
    if signal == "neg_mean_entropy" and top_k is not None and fit_k not in (None, str(top_k)):
        return f"calibrated on top-{fit_k} entropy, the gateway asks for top-{top_k}"
    return None


def threshold_from_tags(
    tags: Mapping[str, str],
    signal: str,
    hold_tokens: int,
    quantile: float | None = None,
) -> tuple[float | None, str]:
    """(threshold, why) from a version's tags: the calibrated threshold when it is present,
    certified, and fit for this `signal` and `hold_tokens`; else (None, the reason)."""
    raw = tags.get(THRESHOLD_TAG)
    if raw is None:
        return None, "no calibrated threshold"
    try:
        threshold = float(raw)
    except ValueError:
        return None, f"unreadable calibrated threshold {raw!r}"
    if math.isnan(threshold) or threshold > 0:
        return None, f"calibrated threshold {raw!r} is not a log-probability (<= 0)"
    certified = str(tags.get(CERTIFIED_TAG, "true")).strip().lower()
    if certified in _FALSE:
        return None, "calibration found no threshold meeting its risk bound (not certified)"
    if certified not in _TRUE:
        return None, f"unreadable certified tag {certified!r}"
    problem = fit_problem(tags, signal, hold_tokens, quantile)
    if problem is not None:
        return None, problem
    return threshold, "calibrated"
