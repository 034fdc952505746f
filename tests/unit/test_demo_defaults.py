"""The demo world as configuration: each command's needs are filled from the world only where
the config leaves them unset, and never with `demo.enabled: false`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stillhouse.common.config import DemoSettings, EngineRef, Settings
from stillhouse.demo.build import DemoWorld
from stillhouse.demo.defaults import complete_settings, demo_settings, missing_settings

WORLD = DemoWorld(Path("/w"), {})


def test_an_empty_config_misses_everything_the_demo_can_fill():
    assert missing_settings(Settings()) == [
        "gateway.engines.teacher",
        "redistill.teacher.model",
        "redistill.data.source",
        "rollout.calibration.prompts_file",
    ]
    assert missing_settings(Settings(), {"teacher"}) == ["gateway.engines.teacher"]


def test_the_world_fills_what_is_unset_and_keeps_what_is_configured():
    teacher = EngineRef(base_url="http://t:8000/v1", served_name="t")
    cfg = Settings().model_copy(
        update={
            "gateway": Settings().gateway.model_copy(
                update={
                    "engines": Settings().gateway.engines.model_copy(update={"teacher": teacher})
                }
            )
        }
    )
    done = demo_settings(cfg, WORLD)
    assert done.gateway.engines.teacher == teacher
    assert done.redistill.teacher.model == "/w/teacher"
    assert done.redistill.data.source == Path("/w/corpus/train.jsonl")
    assert done.rollout.calibration.prompts_file == Path("/w/corpus/val.jsonl")
    assert done.rollout.calibration.test_prompts_file == Path("/w/corpus/test.jsonl")
    assert missing_settings(done) == []


def test_only_the_needs_asked_for_are_filled():
    done = demo_settings(Settings(), WORLD, {"teacher"})
    assert done.gateway.engines.teacher == EngineRef(model="/w/teacher", served_name="teacher")
    assert done.redistill.data.source is None


def test_configured_distillation_prompts_mean_traffic_for_calibration():
    cfg = demo_settings(Settings(), WORLD, {"distill"})  # as if data.source was configured
    assert missing_settings(cfg, {"calibration"}) == []


def test_a_disabled_demo_fills_nothing_and_builds_nothing():
    cfg = Settings(demo=DemoSettings(enabled=False))
    assert missing_settings(cfg) == []
    assert complete_settings(cfg, {"teacher", "distill"}) is cfg


def test_an_unknown_need_is_refused():
    with pytest.raises(ValueError, match="unknown need"):
        missing_settings(Settings(), {"teachers"})
