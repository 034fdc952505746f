"""The demo world plugged into re-distillation: its prompts and teacher as the run's inputs,
students scored on its test split as served by vLLM, and the demo teacher's card.

    settings, hooks = demo_redistill_inputs(settings, console)   # what `stillhouse redistill` needs
    redistill(settings, console, hooks=hooks)

`demo_redistill_inputs` builds (or reuses) the world only when the config leaves
`redistill.data.source` or `redistill.teacher.model` unset, and checks the training config first,
so a config that cannot train fails before an hour of building.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from stillhouse.common.config import Settings
from stillhouse.demo.build import DemoWorld, build_demo_world
from stillhouse.demo.defaults import demo_settings, missing_settings
from stillhouse.demo.evaluate import TriageScore
from stillhouse.rollout.distill.hooks import DistillHooks, TeacherCard
from stillhouse.rollout.distill.pipeline import training_variants


@dataclass(frozen=True)
class DemoServedEvaluation:
    """Category and priority accuracy on the demo test split (a `ServedEvaluation`)."""

    world: DemoWorld

    def __call__(self, base_url: str, served_name: str, model_dir: Path) -> TriageScore:
        from openai import OpenAI
        from transformers import AutoTokenizer

        from stillhouse.demo.evaluate import evaluate_served_model

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        client = OpenAI(base_url=base_url, api_key="unused", timeout=300)
        triage, _, _ = evaluate_served_model(client, served_name, tok, self.world.split("test"), [])
        return triage


def teacher_card(manifest: dict[str, Any]) -> TeacherCard:
    """The demo teacher's size and its vLLM-served accuracy, as the world's manifest has them."""
    triage = manifest.get("teacher_eval", {}).get("triage", {})
    return TeacherCard(
        parameters=manifest["teacher"]["parameters"],
        category_accuracy=triage.get("category_accuracy"),
        priority_accuracy=triage.get("priority_accuracy"),
        hard_category_accuracy=triage.get("hard_category_accuracy"),
    )


def demo_distill_hooks(settings: Settings, world: DemoWorld) -> DistillHooks:
    """Students scored on the world's test split; the teacher's card when the run's teacher is
    the world's (unset, or its directory)."""
    model = settings.redistill.teacher.model
    is_demo_teacher = model is None or Path(model) == world.teacher_dir
    return DistillHooks(
        served_evaluation=DemoServedEvaluation(world),
        teacher_card=teacher_card(world.manifest) if is_demo_teacher else None,
    )


def demo_redistill_inputs(
    settings: Settings, console: Console
) -> tuple[Settings, DistillHooks | None]:
    """The settings and hooks `redistill` runs with: unchanged and none when the config names
    both the prompts and the teacher; else the demo world's (built or reused) fill the gaps."""
    if not missing_settings(settings, {"distill"}):
        return settings, None
    training_variants(settings)  # a config that cannot train fails before the world is built
    world = build_demo_world(settings, console=console)
    return demo_settings(settings, world, {"distill"}), demo_distill_hooks(settings, world)
