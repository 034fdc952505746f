"""The demo's students: last week's (the champion), this week's (the challenger), and a
deliberately degraded one (trained on shuffled answers) for the rollout to catch.

Both are real re-distillations of the demo teacher, registered in MLflow. Last week's had a
smaller budget (fewer prompts and epochs), so the A/B test has a real difference to find. Each
run is skipped when the registry already holds a version with the same data and config (the
re-distillation's own duplicate check), so a second `make demo` trains nothing.

The demo then points the aliases at them: `champion` at last week's student, `challenger` at
this week's, and drops `previous-champion`: the starting point of the rollout cycle, said so
in one line. From there on only the rollout controller moves aliases. The degraded student is
registered without an alias; the demo makes it the challenger for the second cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from stillhouse.common.config import Settings
from stillhouse.common.registry import RegistryClient, VersionInfo
from stillhouse.common.roles import Alias
from stillhouse.demo.distill_hooks import demo_redistill_inputs
from stillhouse.rollout.distill.pipeline import redistill
from stillhouse.rollout.distill.summary import print_redistill_outcome

# Last week's budget: a third of the prompts, a third of the epochs.
LAST_WEEK_MAX_PROMPTS = 1500
LAST_WEEK_EPOCHS = 2


@dataclass(frozen=True)
class DemoStudents:
    champion: VersionInfo
    challenger: VersionInfo
    degraded: VersionInfo


def last_week_settings(settings: Settings) -> Settings:
    rs = settings.redistill
    return settings.model_copy(
        update={
            "redistill": rs.model_copy(
                update={
                    "data": rs.data.model_copy(update={"max_prompts": LAST_WEEK_MAX_PROMPTS}),
                    "training": rs.training.model_copy(update={"epochs": LAST_WEEK_EPOCHS}),
                    "sft_baseline": False,
                    "evaluate_served": False,
                }
            )
        }
    )


def this_week_settings(settings: Settings) -> Settings:
    # The SFT-only baseline is `stillhouse redistill`'s report; the demo skips it (minutes).
    rs = settings.redistill
    return settings.model_copy(update={"redistill": rs.model_copy(update={"sft_baseline": False})})


def degraded_settings(settings: Settings) -> Settings:
    """Last week's budget, trained on shuffled answers: a challenger the gates must stop."""
    base = last_week_settings(settings)
    rs = base.redistill
    return base.model_copy(
        update={
            "redistill": rs.model_copy(
                update={"data": rs.data.model_copy(update={"shuffle_targets": True})}
            )
        }
    )


def _distill(
    settings: Settings, console: Console, label: str, alias: str | None = Alias.CHALLENGER
) -> VersionInfo:
    console.print(f"[bold]{label}[/]")
    settings, hooks = demo_redistill_inputs(settings, console)
    outcome = redistill(settings, console, hooks=hooks, alias=alias)
    if outcome.version is None:
        assert outcome.duplicate_of is not None
        return outcome.duplicate_of
    print_redistill_outcome(outcome, console)
    return outcome.version


def ensure_demo_students(settings: Settings, console: Console) -> DemoStudents:
    last_week = _distill(
        last_week_settings(settings), console, "last week's student (smaller budget)"
    )
    this_week = _distill(this_week_settings(settings), console, "this week's student")
    degraded = _distill(
        degraded_settings(settings), console, "a degraded student (shuffled answers)", alias=None
    )
    registry = RegistryClient.from_settings(settings)
    registry.set_alias(Alias.CHAMPION, last_week.version)
    registry.set_alias(Alias.CHALLENGER, this_week.version)
    registry.delete_alias(Alias.PREVIOUS_CHAMPION)
    name = settings.mlflow.registered_model
    console.print(
        f"demo set-up: {name}@{Alias.CHAMPION} -> version {last_week.version} (last week's), "
        f"@{Alias.CHALLENGER} -> version {this_week.version} (this week's); the degraded "
        f"student is version {degraded.version}"
    )
    return DemoStudents(
        registry.resolve(registry.alias_uri(Alias.CHAMPION)),
        registry.resolve(registry.alias_uri(Alias.CHALLENGER)),
        registry.resolve_version(degraded.version),
    )
