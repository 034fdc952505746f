"""The judge's verdict cache: one SQLite row per (judge model, template version, mode, inputs).

A rerun of an evaluation asks the judge nothing it has answered before. Only parsed verdicts are
stored: an endpoint failure or an unparseable reply is asked again next time. Pairwise
comparisons are cached per order shown, so comparing (x, y) and later (y, x) shares both rows.

    cache = JudgeCache(Path(".stillhouse/judge-cache.db"))
    key = cache_key("teacher", template.version, "single", (question, answer))
    cache.get(key) or cache.put(key, "teacher", template.version, "single", {"score": 5, ...})

Standard library only (sqlite3, WAL, so a report can read while a judge run writes).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stillhouse.common.errors import StillhouseError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    template_version TEXT NOT NULL,
    mode TEXT NOT NULL,
    verdict TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


class JudgeCacheError(StillhouseError):
    """The cache file cannot be opened or is not a judge cache."""


def cache_key(model: str, template_version: str, mode: str, inputs: Sequence[str]) -> str:
    """A digest of everything that decides the verdict: the judge model, the template version
    (prompt format + schema), the mode ("single" | "pairwise") and the texts in the order shown."""
    blob = json.dumps([model, template_version, mode, list(inputs)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgeCache:
    """Parsed verdicts by key. One connection, used from one thread (the judge's event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise JudgeCacheError(f"cannot open the judge cache {path}: {e}") from None

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(
        self, key: str, model: str, template_version: str, mode: str, verdict: dict[str, Any]
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?)",
            (key, model, template_version, mode, json.dumps(verdict), time.time()),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self._db.close()
