"""Print what the demo build made and how good the teacher is, against the acceptance bars."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from stillhouse.common.formatting import percent
from stillhouse.demo.build import DemoWorld

# The demo world's acceptance bars for the teacher as served by vLLM.
BARS = {"category": 0.95, "priority": 0.90, "judge_parsed": 0.99}


def _mark(value: float, bar: float) -> str:
    return "[green]ok[/]" if value >= bar else "[red]below bar[/]"


def teacher_eval_table(result: dict[str, Any]) -> Table:
    triage, judge = result["triage"], result["judge"]
    table = Table(title=f"teacher on the test split, served by {result['served_by']}")
    table.add_column("measure")
    table.add_column("all", justify="right")
    table.add_column("hard slice", justify="right")
    table.add_column("bar", justify="right")
    table.add_column("")
    table.add_row(
        "category accuracy",
        percent(triage["category_accuracy"], spaced=True),
        percent(triage["hard_category_accuracy"], spaced=True),
        percent(BARS["category"], spaced=True),
        _mark(triage["category_accuracy"], BARS["category"]),
    )
    table.add_row(
        "priority accuracy",
        percent(triage["priority_accuracy"], spaced=True),
        percent(triage["hard_priority_accuracy"], spaced=True),
        percent(BARS["priority"], spaced=True),
        _mark(triage["priority_accuracy"], BARS["priority"]),
    )
    for tag, (cat, pri) in triage.get("by_tag", {}).items():
        table.add_row(
            f"  {tag.replace('_', ' ')} (category / priority)",
            "",
            f"{percent(cat, spaced=True)} / {percent(pri, spaced=True)}",
        )
    table.add_row("answers in triage format", percent(triage["parsed"], spaced=True), "", "", "")
    table.add_row(
        "judge verdicts parse as JSON",
        percent(judge["parsed"], spaced=True),
        "",
        percent(BARS["judge_parsed"], spaced=True),
        _mark(judge["parsed"], BARS["judge_parsed"]),
    )
    table.add_row(
        "judge score = ground truth", percent(judge["exact_agreement"], spaced=True), "", "", ""
    )
    table.add_row(
        "judge 'fully correct' agrees", percent(judge["correct_agreement"], spaced=True), "", "", ""
    )
    pairwise = result.get("pairwise")
    if pairwise:  # one order only here; `stillhouse judge` asks both
        table.add_row(
            "pairwise judge agrees (non-tie pairs)",
            percent(pairwise["agreement_without_ties"], spaced=True),
            "",
            "",
            f"{pairwise['non_tie_pairs']} pairs",
        )
    table.caption = (
        f"{triage['n']} tickets ({triage['hard_n']} hard), {judge['n']} judge prompts, "
        f"{result['seconds']} s"
    )
    return table


def print_build_summary(world: DemoWorld, console: Console) -> None:
    m = world.manifest
    teacher = m["teacher"]
    console.print(
        f"demo world at {world.root}: teacher {teacher['parameters'] / 1e6:.2f}M parameters, "
        f"trained in {teacher['train_seconds']} s (final loss {teacher['final_loss']})"
    )
    if "teacher_eval" in m:
        console.print(teacher_eval_table(m["teacher_eval"]))
    else:
        console.print("teacher not yet evaluated on vLLM")
