"""The calibrated threshold in registry tags: when the gateway may use it, and why not."""

from __future__ import annotations

import pytest

from stillhouse.common.calibration_tags import (
    CALIBRATION_TAG_PREFIX,
    calibration_tags,
    threshold_from_tags,
)

P = CALIBRATION_TAG_PREFIX
FIT = {P + "threshold": "-0.42", P + "certified": "true", P + "signal": "mean_logprob",
       P + "hold_tokens": "8"}  # fmt: skip


@pytest.mark.parametrize(
    "tags,expected,why",
    [
        (FIT, -0.42, "calibrated"),
        ({**FIT, P + "certified": "True"}, -0.42, "calibrated"),
        ({k: v for k, v in FIT.items() if k != P + "certified"}, -0.42, "calibrated"),
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
def test_threshold_from_tags(tags, expected, why):
    value, reason = threshold_from_tags(tags, "mean_logprob", 8)
    assert value == expected
    assert why in reason


def test_the_quantile_signal_also_needs_the_same_quantile():
    tags = {**FIT, P + "signal": "quantile", P + "quantile": "0.1"}
    assert threshold_from_tags(tags, "quantile", 8, 0.1) == (-0.42, "calibrated")
    value, why = threshold_from_tags(tags, "quantile", 8, 0.2)
    assert value is None and "quantile 0.1" in why


def test_calibration_tags_keeps_only_its_prefix():
    assert calibration_tags({**FIT, "teacher": "t1"}) == FIT
