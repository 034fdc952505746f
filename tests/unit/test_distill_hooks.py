"""The demo world plugged into re-distillation (demo/distill_hooks.py) and the hooks' types
(rollout/distill/hooks.py)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from stillhouse.common.config import (
    DataSettings,
    KdSettings,
    RedistillSettings,
    Settings,
    TeacherSettings,
)
from stillhouse.common.errors import UsageError
from stillhouse.demo.build import DemoWorld
from stillhouse.demo.defaults import demo_settings
from stillhouse.demo.distill_hooks import (
    DemoServedEvaluation,
    demo_distill_hooks,
    demo_redistill_inputs,
    teacher_card,
)
from stillhouse.rollout.distill.hooks import TeacherCard, scores_record

MANIFEST = {
    "teacher": {"parameters": 3_900_000},
    "teacher_eval": {
        "served_by": "vllm",
        "triage": {
            "category_accuracy": 0.9,
            "priority_accuracy": 0.7,
            "hard_category_accuracy": 0.65,
        },
    },
}


def _world(tmp_path: Path, manifest: dict = MANIFEST) -> DemoWorld:
    return DemoWorld(tmp_path / "demo", manifest)


def test_the_teacher_card_is_the_manifests_size_and_served_accuracy(tmp_path):
    assert teacher_card(MANIFEST) == TeacherCard(3_900_000, 0.9, 0.7, 0.65)
    # not evaluated on vLLM yet: the size alone
    assert teacher_card({"teacher": {"parameters": 5}}) == TeacherCard(5)


def test_unset_inputs_are_filled_with_the_worlds_and_set_ones_kept(tmp_path):
    world = _world(tmp_path)
    filled = demo_settings(Settings(), world, {"distill"}).redistill
    assert filled.data.source == world.corpus_dir / "train.jsonl"
    assert filled.teacher.model == str(world.teacher_dir)
    own = RedistillSettings(
        data=DataSettings(source=tmp_path / "p.jsonl", max_prompts=99),
        teacher=TeacherSettings(model="/models/t", top_k=5),
    )
    kept = demo_settings(Settings(redistill=own), world, {"distill"}).redistill
    assert kept == own


def test_the_teacher_card_comes_only_with_the_worlds_own_teacher(tmp_path):
    world = _world(tmp_path)
    unset = demo_distill_hooks(Settings(), world)
    assert unset.teacher_card == TeacherCard(3_900_000, 0.9, 0.7, 0.65)
    assert isinstance(unset.served_evaluation, DemoServedEvaluation)
    filled = demo_distill_hooks(demo_settings(Settings(), world, {"distill"}), world)
    assert filled.teacher_card == unset.teacher_card
    other = Settings(redistill=RedistillSettings(teacher=TeacherSettings(model="/models/t")))
    hooks = demo_distill_hooks(other, world)
    assert hooks.teacher_card is None  # another teacher: the demo's numbers are not its
    assert hooks.served_evaluation is not None  # students are still scored on the demo task


def test_a_config_naming_both_inputs_needs_no_demo_world(tmp_path):
    rs = RedistillSettings(
        data=DataSettings(source=tmp_path / "p.jsonl"), teacher=TeacherSettings(model="/t")
    )
    settings = Settings(state_dir=tmp_path, redistill=rs)
    assert demo_redistill_inputs(settings, Console(quiet=True)) == (settings, None)
    assert not (tmp_path / "demo").exists()


def test_a_config_that_cannot_train_fails_before_the_world_is_built(tmp_path):
    settings = Settings(
        state_dir=tmp_path, redistill=RedistillSettings(kd=KdSettings(temperature=2))
    )
    with pytest.raises(UsageError, match="temperature"):
        demo_redistill_inputs(settings, Console(quiet=True))
    assert not (tmp_path / "demo").exists()


def test_served_scores_are_recorded_whole_for_a_dataclass_and_by_name_otherwise():
    @dataclass(frozen=True)
    class Triage:
        n: int
        category_accuracy: float
        priority_accuracy: float
        hard_category_accuracy: float

    assert scores_record(Triage(9, 0.5, 0.4, 0.3)) == {
        "n": 9,
        "category_accuracy": 0.5,
        "priority_accuracy": 0.4,
        "hard_category_accuracy": 0.3,
    }

    class Plain:
        category_accuracy, priority_accuracy, hard_category_accuracy = 0.5, 0.4, 0.3

    assert scores_record(Plain()) == {
        "category_accuracy": 0.5,
        "priority_accuracy": 0.4,
        "hard_category_accuracy": 0.3,
    }
