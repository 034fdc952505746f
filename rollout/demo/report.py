"""Print what the demo build made and how good the teacher is, against the acceptance bars."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from stillhouse.rollout.demo.build import DemoWorld

# The demo world's acceptance bars for the teacher as served by vLLM.
BARS = {"category": 0.95, "priority": 0.90, "judge_parsed": 0.99}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


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
        _pct(triage["category_accuracy"]),
        _pct(triage["hard_category_accuracy"]),
        _pct(BARS["category"]),
        _mark(triage["category_accuracy"], BARS["category"]),
    )
    table.add_row(
        "priority accuracy",
        _pct(triage["priority_accuracy"]),
        _pct(triage["hard_priority_accuracy"]),
        _pct(BARS["priority"]),
        _mark(triage["priority_accuracy"], BARS["priority"]),
    )
    for tag, (cat, pri) in triage.get("by_tag", {}).items():
        table.add_row(
            f"  {tag.replace('_', ' ')} (category / priority)", "", f"{_pct(cat)} / {_pct(pri)}"
        )
    table.add_row("answers in triage format", _pct(triage["parsed"]), "", "", "")
    table.add_row(
        "judge verdicts parse as JSON",
        _pct(judge["parsed"]),
        "",
        _pct(BARS["judge_parsed"]),
        _mark(judge["parsed"], BARS["judge_parsed"]),
    )
    table.add_row("judge score = ground truth", _pct(judge["exact_agreement"]), "", "", "")
    table.add_row("judge 'fully correct' agrees", _pct(judge["correct_agreement"]), "", "", "")
    pairwise = result.get("pairwise")
    if pairwise:  # one order only here; `stillhouse judge` asks both
        table.add_row(
            "pairwise judge agrees (non-tie pairs)",
            _pct(pairwise["agreement_without_ties"]),
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
