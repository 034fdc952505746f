"""A version's calibrated fallback threshold as registry tags: the one writer format and the one
parser. The calibration job writes them (`rollout`); the gateway and the controller read them.

    stillhouse.calibration.threshold    "-0.412"        the confidence threshold (<= 0)
    stillhouse.calibration.certified    "true"          false: no threshold met the risk bound
    stillhouse.calibration.signal       "mean_logprob"  the signal it was fit for
    stillhouse.calibration.hold_tokens  "8"             over how many first tokens
    ...quantile, top_k                                  where the signal uses them
    ...epsilon, delta, risk, n, student_share, ...      what calibration measured (optional)

A threshold means something only on the score it was picked for (`fit_problem`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stillhouse.common.config import ConfidenceSettings

CALIBRATION_TAG_PREFIX = "stillhouse.calibration."
THRESHOLD_TAG = CALIBRATION_TAG_PREFIX + "threshold"
CERTIFIED_TAG = CALIBRATION_TAG_PREFIX + "certified"
SIGNAL_TAG = CALIBRATION_TAG_PREFIX + "signal"
HOLD_TOKENS_TAG = CALIBRATION_TAG_PREFIX + "hold_tokens"
QUANTILE_TAG = CALIBRATION_TAG_PREFIX + "quantile"
TOP_K_TAG = CALIBRATION_TAG_PREFIX + "top_k"


@dataclass(frozen=True)
class CalibrationTags:
    """A version's calibration, as written to and read back from its tags. The first four
    fields decide how the gateway serves it; the rest record what calibration measured."""

    threshold: float
    certified: bool
    signal: str
    hold_tokens: int
    quantile: float | None = None
    top_k: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    risk: str | None = None
    n: int | None = None
    student_share: float | None = None
    risk_hat: float | None = None
    risk_upper: float | None = None
    apgr: float | None = None
    calibrated_at: str | None = None
    test_share: float | None = None
    test_risk: float | None = None

    def to_tags(self) -> dict[str, str]:
        """All set fields as tag strings. Floats that decide (threshold, quantile) are written
        with `repr`, so they read back as the exact floats: the gateway's `score < threshold`
        must cut where calibration cut."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, float):
                text = repr(value) if f.name in ("threshold", "quantile") else f"{value:.6g}"
            else:
                text = str(value)
            out[CALIBRATION_TAG_PREFIX + f.name] = text
        return out


def calibration_only(tags: Mapping[str, str]) -> dict[str, str]:
    """Only the calibration tags (what decides the threshold), e.g. to notice a change."""
    return {k: str(v) for k, v in tags.items() if k.startswith(CALIBRATION_TAG_PREFIX)}


def fit_problem(tags: Mapping[str, str], conf: ConfidenceSettings) -> str | None:
    """Why a calibration does not fit a gateway scoring with `conf` (its signal over
    `hold_tokens` tokens, and the quantile or the top-k entropy where the signal uses them);
    None when it fits."""
    fit_signal = tags.get(SIGNAL_TAG)
    if fit_signal is None or tags.get(HOLD_TOKENS_TAG) is None:
        return "calibration tags do not say which signal and hold_tokens they fit"
    if fit_signal != conf.signal:
        return f"calibrated for signal {fit_signal}, the gateway uses {conf.signal}"
    try:
        fit_hold = int(tags[HOLD_TOKENS_TAG])
    except ValueError:
        return f"unreadable hold_tokens tag {tags[HOLD_TOKENS_TAG]!r}"
    if fit_hold != conf.hold_tokens:
        return f"calibrated over {fit_hold} tokens, the gateway holds {conf.hold_tokens}"
    if conf.signal == "quantile" and QUANTILE_TAG in tags:
        try:
            fit_q = float(tags[QUANTILE_TAG])
        except ValueError:
            return f"unreadable quantile tag {tags[QUANTILE_TAG]!r}"
        if not math.isclose(fit_q, conf.quantile, rel_tol=1e-9, abs_tol=1e-12):
            return f"calibrated for quantile {fit_q}, the gateway uses {conf.quantile}"
    # The top-k entropy changes with k: a threshold fit on another k means nothing here.
    fit_k = tags.get(TOP_K_TAG)
    if conf.signal == "neg_mean_entropy" and fit_k not in (None, str(conf.top_k)):
        return f"calibrated on top-{fit_k} entropy, the gateway asks for top-{conf.top_k}"
    return None


def _bool(text: str) -> bool:
    return {"true": True, "false": False}[text.strip().lower()]


_CAST: dict[str, Any] = {"float": float, "int": int, "str": str, "bool": _bool}


def _malformed(why: str) -> tuple[None, str]:
    return None, f"calibration tags are malformed: {why}"


def read_calibration(
    tags: Mapping[str, str], conf: ConfidenceSettings
) -> tuple[CalibrationTags | None, str | None]:
    """(calibration, None) when it is readable and fits `conf`; (None, None) when the version
    was never calibrated; (None, why) otherwise. Certified or not: the caller decides."""
    raw = tags.get(THRESHOLD_TAG)
    if raw is None:
        return None, None
    try:
        threshold = float(raw)
    except ValueError:
        return _malformed(f"unreadable calibrated threshold {raw!r}")
    if math.isnan(threshold) or threshold > 0:
        return _malformed(f"calibrated threshold {raw!r} is not a log-probability (<= 0)")
    if CERTIFIED_TAG not in tags:
        return _malformed("no certified tag")
    try:
        _bool(tags[CERTIFIED_TAG])
    except KeyError:
        return _malformed(f"unreadable certified tag {tags[CERTIFIED_TAG]!r}")
    problem = fit_problem(tags, conf)
    if problem is not None:
        return None, problem
    values: dict[str, Any] = {}
    for f in dataclasses.fields(CalibrationTags):
        text = tags.get(CALIBRATION_TAG_PREFIX + f.name)
        if text is None:
            continue
        kind = str(f.type).partition(" | ")[0]
        try:
            values[f.name] = _CAST[kind](text)
        except (KeyError, ValueError):
            return _malformed(f"unreadable {f.name} tag {text!r}")
    return CalibrationTags(**values), None


def serving_threshold(
    tags: Mapping[str, str], conf: ConfidenceSettings
) -> tuple[float | None, str]:
    """(threshold, why) the gateway serves a version with: its calibrated threshold when that
    is readable, certified and fits `conf`; else (None, the reason), and the configured one
    applies."""
    cal, problem = read_calibration(tags, conf)
    if problem is not None:
        return None, problem
    if cal is None:
        return None, "no calibrated threshold"
    if not cal.certified:
        return None, "calibration found no threshold meeting its risk bound (not certified)"
    return cal.threshold, "calibrated"
