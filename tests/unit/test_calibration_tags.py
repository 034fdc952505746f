"""The calibrated threshold in registry tags: when the gateway may use it, and why not."""

from __future__ import annotations

import pytest

from stillhouse.common.calibration_tags import (
    CALIBRATION_TAG_PREFIX,
    CalibrationTags,
    calibration_only,
    read_calibration,
    serving_threshold,
)
from stillhouse.common.config import ConfidenceSettings

P = CALIBRATION_TAG_PREFIX
FIT = {
    P + "threshold": "-0.42",
    P + "certified": "true",
    P + "signal": "mean_logprob",
    P + "hold_tokens": "8",
}


@pytest.mark.parametrize(
    "tags,expected,why",
    [
        (FIT, -0.42, "calibrated"),
        ({**FIT, P + "certified": "True"}, -0.42, "calibrated"),
        ({k: v for k, v in FIT.items() if k != P + "certified"}, None, "no certified tag"),
        ({}, None, "no calibrated threshold"),
        ({"data_window": "7d"}, None, "no calibrated threshold"),
        ({**FIT, P + "threshold": "abc"}, None, "unreadable"),
        ({**FIT, P + "threshold": "nan"}, None, "not a log-probability"),
        ({**FIT, P + "threshold": "0.2"}, None, "not a log-probability"),
        ({**FIT, P + "threshold": "-inf"}, float("-inf"), "calibrated"),
        ({**FIT, P + "certified": "false"}, None, "not certified"),
        ({**FIT, P + "certified": "maybe"}, None, "unreadable certified"),
        ({**FIT, P + "signal": "min_logprob"}, None, "signal min_logprob"),
        ({**FIT, P + "hold_tokens": "16"}, None, "over 16 tokens"),
        ({**FIT, P + "hold_tokens": "x"}, None, "unreadable hold_tokens"),
        ({k: v for k, v in FIT.items() if k != P + "signal"}, None, "do not say"),
    ],
)
def test_serving_threshold(tags, expected, why):
    conf = ConfidenceSettings(signal="mean_logprob", hold_tokens=8)
    value, reason = serving_threshold(tags, conf)
    assert value == expected
    assert why in reason


def test_the_quantile_signal_also_needs_the_same_quantile():
    tags = {**FIT, P + "signal": "quantile", P + "quantile": "0.1"}
    conf = ConfidenceSettings(signal="quantile", hold_tokens=8, quantile=0.1)
    assert serving_threshold(tags, conf) == (-0.42, "calibrated")
    value, why = serving_threshold(tags, conf.model_copy(update={"quantile": 0.2}))
    assert value is None and "quantile 0.1" in why


def test_calibration_only_keeps_only_its_prefix():
    assert calibration_only({**FIT, "teacher": "t1"}) == FIT


def test_the_gateway_also_checks_the_top_k_of_an_entropy_calibration():
    tags = {**FIT, P + "signal": "neg_mean_entropy", P + "top_k": "5"}
    conf = ConfidenceSettings(signal="neg_mean_entropy", hold_tokens=8, top_k=5)
    assert serving_threshold(tags, conf) == (-0.42, "calibrated")
    value, why = serving_threshold(tags, conf.model_copy(update={"top_k": 3}))
    assert value is None and "top-5" in why


def test_written_tags_read_back_as_the_same_calibration():
    written = CalibrationTags(
        threshold=-0.1 / 3,
        certified=True,
        signal="quantile",
        hold_tokens=4,
        quantile=0.1,
        top_k=5,
        epsilon=0.1,
        delta=0.05,
        risk="served",
        n=200,
        student_share=0.61,
        calibrated_at="2026-01-01T00:00:00+00:00",
    )
    conf = ConfidenceSettings(signal="quantile", hold_tokens=4, quantile=0.1, top_k=5)
    read, problem = read_calibration(written.to_tags(), conf)
    assert problem is None and read == written  # the threshold as the exact float


def _tags(**overrides: str) -> dict[str, str]:
    base = {
        "threshold": "-0.3125",
        "certified": "true",
        "epsilon": "0.1",
        "delta": "0.1",
        "risk": "served",
        "signal": "mean_logprob",
        "hold_tokens": "8",
        "quantile": "0.1",
        "top_k": "5",
        "n": "400",
        "student_share": "0.6",
        "risk_hat": "0.05",
        "risk_upper": "0.09",
        "apgr": "0.7",
        "calibrated_at": "2026-01-01T00:00:00+00:00",
    }
    base.update(overrides)
    return {"other": "x", **{P + k: v for k, v in base.items()}}


@pytest.mark.parametrize(
    ("conf", "tags", "usable", "reason"),
    [
        ({}, _tags(), True, None),
        ({"signal": "min_logprob"}, _tags(), False, "signal mean_logprob"),
        ({"hold_tokens": 16}, _tags(), False, "over 8 tokens"),
        ({"signal": "quantile", "quantile": 0.2}, _tags(signal="quantile"), False, "quantile"),
        ({"quantile": 0.2}, _tags(), True, None),  # the quantile matters only to its signal
        (
            {"signal": "neg_mean_entropy", "top_k": 3},
            _tags(signal="neg_mean_entropy"),
            False,
            "top-5",
        ),
        ({"top_k": 3}, _tags(), True, None),
        ({}, _tags(threshold="x"), False, "malformed"),
        ({}, _tags(certified="yes"), False, "malformed"),
        ({}, _tags(threshold="nan"), False, "malformed"),
    ],
)
def test_read_calibration_accepts_only_a_calibration_of_the_gateways_score(
    conf, tags, usable, reason
):
    cal, why = read_calibration(tags, ConfidenceSettings(**conf))
    assert (cal is not None) is usable
    if reason is None:
        assert why is None and cal is not None and cal.threshold == -0.3125
    else:
        assert why is not None and reason in why


def test_read_calibration_of_an_uncalibrated_version_is_none_without_a_reason():
    assert read_calibration({"n": "1"}, ConfidenceSettings()) == (None, None)
    missing = {k: v for k, v in _tags().items() if not k.endswith(".certified")}
    cal, why = read_calibration(missing, ConfidenceSettings())
    assert cal is None and why is not None and "certified" in why


def test_a_calibration_without_its_measurements_is_still_usable():
    bare = {k: v for k, v in _tags().items() if not k.endswith((".epsilon", ".n", ".apgr"))}
    cal, why = read_calibration(bare, ConfidenceSettings(top_k=5))
    assert why is None and cal is not None and cal.epsilon is None and cal.threshold == -0.3125
