"""The demo world as configuration: what the CLI fills in when the config leaves it unset.

    settings = complete_settings(settings, {"teacher"}, console)   # builds the world if needed

Each command asks for what it needs: "teacher" (`gateway.engines.teacher`), "distill" (the
teacher's weights and the prompts to distil on: the corpus's train split) or "calibration"
(held-out prompts, the val and test splits no student trains on; only when the distillation
prompts are unset too). Filled only where unset and only with `demo.enabled` (the default);
production code never builds the demo on its own.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from rich.console import Console

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.roles import Role
from stillhouse.demo.build import DemoWorld, build_demo_world

NEEDS = ("teacher", "distill", "calibration")


def missing_settings(settings: Settings, needs: Collection[str] = NEEDS) -> list[str]:
    """The settings the demo world would fill in for `needs` (empty: the config has them)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown need {sorted(unknown)[0]!r}; expected one of {NEEDS}")
    if not settings.demo.enabled:
        return []
    rs, cal = settings.redistill, settings.rollout.calibration
    unset = {
        "teacher": {"gateway.engines.teacher": settings.gateway.engines.teacher is None},
        "distill": {
            "redistill.teacher.model": rs.teacher.model is None,
            "redistill.data.source": rs.data.source is None,
        },
        "calibration": {
            "rollout.calibration.prompts_file": cal.prompts_file is None and rs.data.source is None
        },
    }
    return [name for need in needs for name, is_unset in unset[need].items() if is_unset]


def demo_values(world: DemoWorld) -> dict[str, Any]:
    """What each setting is in the demo world."""
    corpus: Path = world.corpus_dir
    return {
        "gateway.engines.teacher": EngineRef(
            model=str(world.teacher_dir), served_name=str(Role.TEACHER)
        ),
        "redistill.teacher.model": str(world.teacher_dir),
        "redistill.data.source": corpus / "train.jsonl",
        "rollout.calibration.prompts_file": corpus / "val.jsonl",
        "rollout.calibration.test_prompts_file": corpus / "test.jsonl",
    }


def demo_settings(settings: Settings, world: DemoWorld, needs: Collection[str] = NEEDS) -> Settings:
    """`settings` with every field `missing_settings` names taken from `world`."""
    values = demo_values(world)
    for name in missing_settings(settings, needs):
        settings = _with(settings, name, values[name])
        if name == "rollout.calibration.prompts_file":
            test = "rollout.calibration.test_prompts_file"
            settings = _with(settings, test, values[test])
    return settings


def complete_settings(
    settings: Settings, needs: Collection[str], console: Console | None = None
) -> Settings:
    """The settings with the demo's values for `needs`; the world is built (or found up to
    date) only when one of them is unset."""
    if not missing_settings(settings, needs):
        return settings
    return demo_settings(settings, build_demo_world(settings, console=console), needs)


def _with(settings: Any, dotted: str, value: Any) -> Any:
    """A copy of the frozen `settings` with the field at `dotted` set to `value`."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return settings.model_copy(update={head: value})
    return settings.model_copy(update={head: _with(getattr(settings, head), rest, value)})
