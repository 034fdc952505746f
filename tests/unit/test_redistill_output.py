"""The re-distillation result as `stillhouse redistill` prints it (rollout/distill/summary.py)."""

import io
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from stillhouse.common.registry import VersionInfo
from stillhouse.rollout.distill.hooks import TeacherCard
from stillhouse.rollout.distill.pipeline import RedistillOutcome
from stillhouse.rollout.distill.student import StudentRun
from stillhouse.rollout.distill.summary import print_redistill_outcome
from stillhouse.rollout.distill.training import DistillResult, EpochStats


class Scores:  # any object with the three accuracies is a ServedScores
    def __init__(self, category: float, priority: float, hard: float) -> None:
        self.category_accuracy, self.priority_accuracy = category, priority
        self.hard_category_accuracy = hard


def _run(name: str, served: Scores | None) -> StudentRun:
    history = [EpochStats(1, 2.0, 1.5, 0.61, 1e-3), EpochStats(2, 1.0, 1.2, 0.7, 1e-4)]
    result = DistillResult(history, 2, False, 10, 1000, 33.3)
    return StudentRun(name, Path("/runs") / name, 690_000, result, served)


def _version(number: int, aliases: tuple[str, ...]) -> VersionInfo:
    created = datetime(2026, 11, 22, tzinfo=UTC)
    return VersionInfo("stillhouse-student", number, aliases, created, "run-1", "/runs/kd/model")


def _printed(outcome: RedistillOutcome) -> list[str]:
    out = io.StringIO()
    print_redistill_outcome(outcome, Console(file=out, width=100, color_system=None))
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_the_table_sets_students_beside_the_teacher_and_names_the_new_version():
    version = _version(4, ("challenger",))
    outcome = RedistillOutcome(
        version,
        runs={"kd": _run("kd", Scores(0.8, 0.6, 0.5)), "sft": _run("sft", None)},
        teacher=TeacherCard(3_900_000, 0.9, 0.7, 0.65),
        seconds=123,
    )
    assert _printed(outcome) == [
        "                     re-distillation: students vs teacher",
        "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━┓",
        "┃                               ┃ KD student ┃ SFT baseline ┃ teacher (vLLM) ┃",
        "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━┩",
        "│ parameters                    │      0.69M │        0.69M │          3.90M │",
        "│ held-out KL(teacher‖student)  │     1.2000 │       1.2000 │                │",
        "│ held-out top-1 agreement      │     70.0 % │       70.0 % │                │",
        "│ epochs (best)                 │      2 (2) │        2 (2) │                │",
        "│ training time                 │       33 s │         33 s │                │",
        "│ category accuracy (vLLM)      │     80.0 % │              │         90.0 % │",
        "│ priority accuracy (vLLM)      │     60.0 % │              │         70.0 % │",
        "│ hard-slice category accuracy  │     50.0 % │              │         65.0 % │",
        "│ category accuracy / teacher's │      0.889 │              │          1.000 │",
        "└───────────────────────────────┴────────────┴──────────────┴────────────────┘",
        "registered stillhouse-student version 4 with alias challenger (promotion to champion is a "
        "separate",
        "step); run took 2.0 min",
    ]


def test_without_hooks_the_table_has_no_teacher_column_and_no_task_rows():
    outcome = RedistillOutcome(None, runs={"kd": _run("kd", None)})
    lines = _printed(outcome)
    assert "teacher (vLLM)" not in "\n".join(lines)
    assert [line.split("│")[1].strip() for line in lines if line.startswith("│")] == [
        "parameters",
        "held-out KL(teacher‖student)",
        "held-out top-1 agreement",
        "epochs (best)",
        "training time",
    ]


def test_a_teacher_card_without_scores_shows_only_its_size():
    outcome = RedistillOutcome(
        None, runs={"kd": _run("kd", Scores(0.8, 0.6, 0.5))}, teacher=TeacherCard(3_900_000)
    )
    rows = {line.split("│")[1].strip(): line for line in _printed(outcome) if "│" in line}
    assert rows["parameters"].rstrip("│ ").endswith("3.90M")
    assert rows["category accuracy (vLLM)"].split("│")[3].strip() == ""
    assert "category accuracy / teacher's" not in rows


def test_a_duplicate_run_prints_nothing_more():
    duplicate = _version(2, ())
    assert _printed(RedistillOutcome(None, duplicate_of=duplicate)) == []
