"""A re-distillation run's result as a table: KD student vs SFT baseline vs teacher, side by side
(`stillhouse redistill` and the demo print it)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stillhouse.common.formatting import percent
from stillhouse.rollout.distill.hooks import TeacherCard
from stillhouse.rollout.distill.pipeline import RedistillOutcome


def outcome_table(outcome: RedistillOutcome, teacher: TeacherCard | None) -> Table:
    table = Table(title="re-distillation: students vs teacher")
    table.add_column("")
    for name in outcome.runs:
        table.add_column("KD student" if name == "kd" else "SFT baseline", justify="right")
    if teacher is not None:
        table.add_column("teacher (vLLM)", justify="right")
    t = teacher or TeacherCard()

    def row(label: str, values: list[str], teacher_value: str = "") -> None:
        table.add_row(label, *values, *([teacher_value] if teacher is not None else []))

    runs = list(outcome.runs.values())
    row(
        "parameters",
        [f"{r.parameters / 1e6:.2f}M" for r in runs],
        f"{t.parameters / 1e6:.2f}M" if t.parameters is not None else "",
    )
    best = [next(h for h in r.result.history if h.epoch == r.result.best_epoch) for r in runs]
    row("held-out KL(teacher‖student)", [f"{b.heldout_kl:.4f}" for b in best])
    row(
        "held-out top-1 agreement", [percent(b.heldout_top1, spaced=True, missing="") for b in best]
    )
    row("epochs (best)", [f"{len(r.result.history)} ({r.result.best_epoch})" for r in runs])
    row("training time", [f"{r.result.seconds:.0f} s" for r in runs])
    if any(r.served is not None for r in runs):
        s = [r.served for r in runs]
        row(
            "category accuracy (vLLM)",
            [percent(x.category_accuracy, spaced=True, missing="") if x else "" for x in s],
            percent(t.category_accuracy, spaced=True, missing=""),
        )
        row(
            "priority accuracy (vLLM)",
            [percent(x.priority_accuracy, spaced=True, missing="") if x else "" for x in s],
            percent(t.priority_accuracy, spaced=True, missing=""),
        )
        row(
            "hard-slice category accuracy",
            [percent(x.hard_category_accuracy, spaced=True, missing="") if x else "" for x in s],
            percent(t.hard_category_accuracy, spaced=True, missing=""),
        )
        if t.category_accuracy:
            tc = t.category_accuracy
            row(
                "category accuracy / teacher's",
                [f"{x.category_accuracy / tc:.3f}" if x else "" for x in s],
                "1.000",
            )
    return table


def print_redistill_outcome(outcome: RedistillOutcome, console: Console) -> None:
    if outcome.duplicate_of is not None:
        return  # redistill already said which version holds this data and config
    console.print(outcome_table(outcome, outcome.teacher))
    v = outcome.version
    if v is not None:
        console.print(
            f"registered [bold]{v.name}[/] version {v.version} with alias "
            f"{', '.join(v.aliases) or '-'} (promotion to champion is a separate step); "
            f"run took {outcome.seconds / 60:.1f} min"
        )
