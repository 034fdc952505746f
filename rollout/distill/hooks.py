"""What a deployment may plug into a re-distillation run, all optional (`DistillHooks`):

- `ServedEvaluation`: scores a student on the deployment's own task while the run serves it on
  vLLM (category, priority and hard-slice accuracy of the triage answer format), logged as
  `<variant>.category_accuracy` etc. and shown in the result table;
- `TeacherCard`: the teacher's size and task scores, the table's last column.

Without hooks a run trains, evaluates on held-out prompts and registers as usual. The demo world
implements both (`demo/distill_hooks.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Protocol


class ServedScores(Protocol):
    """Task accuracy of a served model, each in [0, 1] (any object with these attributes)."""

    @property
    def category_accuracy(self) -> float: ...

    @property
    def priority_accuracy(self) -> float: ...

    @property
    def hard_category_accuracy(self) -> float: ...


class ServedEvaluation(Protocol):
    """Score the model served at `base_url` as `served_name` (its files are in `model_dir`)."""

    def __call__(self, base_url: str, served_name: str, model_dir: Path) -> ServedScores: ...


@dataclass(frozen=True)
class TeacherCard:
    """The teacher's column of the result table: its size, and its task scores as served."""

    parameters: int | None = None
    category_accuracy: float | None = None
    priority_accuracy: float | None = None
    hard_category_accuracy: float | None = None


@dataclass(frozen=True)
class DistillHooks:
    served_evaluation: ServedEvaluation | None = None
    teacher_card: TeacherCard | None = None


def scores_record(scores: ServedScores) -> dict[str, Any]:
    """`scores` as plain data for `eval.json`: every field of a dataclass, else the three."""
    if is_dataclass(scores) and not isinstance(scores, type):
        return asdict(scores)
    return {
        "category_accuracy": scores.category_accuracy,
        "priority_accuracy": scores.priority_accuracy,
        "hard_category_accuracy": scores.hard_category_accuracy,
    }
