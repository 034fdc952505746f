"""The evaluation store: what the judge said about which request, and each student's drift
reference. SQLite beside the traffic log (`<state_dir>/eval.db`), standard library only.

The traffic log says what was served; this says how good it was. `stillhouse judge` writes
judgments, `stillhouse ab` and `stillhouse report` read them joined with the traffic records by
request id. A judgment is keyed by (request, kind, judge model, template version), so a rerun
with the same judge replaces nothing it already has and a new judge or prompt is judged anew.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from types import TracebackType

from stillhouse.common.errors import StillhouseError


class EvalStoreError(StillhouseError):
    """The evaluation store cannot be opened or read."""


@dataclass(frozen=True, slots=True)
class StoredJudgment:
    request_id: str
    kind: str  # "single" (what was served) | "pairwise" (vs the teacher) | "student" (the
    # student's answer that a fallback replaced)
    arm: str
    served_by: str
    student_model: str | None
    judge_model: str
    template_version: str
    ts: float  # the request's time (so windows match the traffic log's)
    status: str  # "ok" | "unparseable" | "error"
    score: int | None = None  # single: 1..5
    outcome: str | None = None  # pairwise, for the served answer vs the reference: win/tie/loss
    truth: str | None = None  # the ground truth's score or outcome, where known (the demo)


@dataclass(frozen=True, slots=True)
class DriftReference:
    student_model: str
    set_at: float
    source: str  # "first-records" | "promotion"
    values: tuple[float, ...]


_JUDGMENT_COLUMNS = tuple(f.name for f in fields(StoredJudgment))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    request_id TEXT NOT NULL, kind TEXT NOT NULL, arm TEXT NOT NULL, served_by TEXT NOT NULL,
    student_model TEXT, judge_model TEXT NOT NULL, template_version TEXT NOT NULL,
    ts REAL NOT NULL, status TEXT NOT NULL, score INTEGER, outcome TEXT, truth TEXT,
    PRIMARY KEY (request_id, kind, judge_model, template_version)
);
CREATE INDEX IF NOT EXISTS judgments_ts ON judgments (ts);
CREATE TABLE IF NOT EXISTS drift_reference (
    student_model TEXT PRIMARY KEY, set_at REAL NOT NULL, source TEXT NOT NULL,
    vals TEXT NOT NULL
);
"""


class EvalStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise EvalStoreError(f"cannot open the evaluation store {path}: {e}") from None

    def save_judgments(self, items: Iterable[StoredJudgment]) -> int:
        rows = [astuple(j) for j in items]
        marks = ", ".join("?" for _ in _JUDGMENT_COLUMNS)
        with self._conn:
            self._conn.executemany(
                f"INSERT OR REPLACE INTO judgments ({', '.join(_JUDGMENT_COLUMNS)}) "
                f"VALUES ({marks})",
                rows,
            )
        return len(rows)

    def judgments(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        kind: str | None = None,
        judge_model: str | None = None,
        template_version: str | None = None,
    ) -> list[StoredJudgment]:
        clauses, params = [], []
        for column, op, value in (
            ("ts", ">=", since),
            ("ts", "<", until),
            ("kind", "=", kind),
            ("judge_model", "=", judge_model),
            ("template_version", "=", template_version),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        cursor = self._conn.execute(
            f"SELECT {', '.join(_JUDGMENT_COLUMNS)} FROM judgments{where} ORDER BY ts", params
        )
        return [StoredJudgment(*row) for row in cursor]

    def judged_ids(self, kind: str, judge_model: str, template_version: str) -> set[str]:
        cursor = self._conn.execute(
            "SELECT request_id FROM judgments WHERE kind = ? AND judge_model = ? "
            "AND template_version = ? AND status = 'ok'",
            (kind, judge_model, template_version),
        )
        return {row[0] for row in cursor}

    def reference(self, student_model: str) -> DriftReference | None:
        row = self._conn.execute(
            "SELECT student_model, set_at, source, vals FROM drift_reference "
            "WHERE student_model = ?",
            (student_model,),
        ).fetchone()
        if row is None:
            return None
        return DriftReference(row[0], row[1], row[2], tuple(json.loads(row[3])))

    def set_reference(
        self, student_model: str, values: Sequence[float], source: str, now: float | None = None
    ) -> DriftReference:
        ref = DriftReference(student_model, now or time.time(), source, tuple(values))
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO drift_reference VALUES (?, ?, ?, ?)",
                (ref.student_model, ref.set_at, ref.source, json.dumps(list(ref.values))),
            )
        return ref

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> EvalStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
