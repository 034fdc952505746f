"""The traffic log: its SQLite schema, its plain record types, and the reader.

The gateway writes the log (`serving/gateway/traffic_log.py`); eval and rollout
read it, usually while the gateway is still writing (the database is in WAL mode, so readers never
block the writer and always see whole committed transactions):

    with TrafficLogReader(settings.traffic_log_path) as log:
        recent = log.records(since=time.time() - 3600, arm="challenger")
        pairs = log.shadow(limit=1000)

Sequences and top-k maps are stored as JSON text; JSON object keys are strings, so the top-k
token ids are turned back into ints on read. Standard library only.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from stillhouse.common.errors import StillhouseError

SCHEMA_VERSION = 2  # 2: requests.student_completion_tokens

# `served_by` of a challenger answer no user saw: the mirror phase mirrors champion-arm requests
# to the challenger (`gateway.ab.mirror_share`). Such a record has arm "challenger", request id
# "<original id>:mirror", and `fallback_reason` set where the gateway would have fallen back.
MIRROR = "mirror"
MIRROR_SUFFIX = ":" + MIRROR


class TrafficLogError(StillhouseError):
    """The traffic log is missing, unreadable, or has a schema this version does not know."""


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    """One answered (or failed) gateway request."""

    request_id: str
    ts: float  # unix seconds, request arrival
    endpoint: str  # "chat" | "completions"
    arm: str  # "champion" | "challenger"
    served_by: str  # "champion" | "challenger" | "teacher" | "none" | MIRROR (no user saw it)
    status: int  # HTTP status returned to the client
    latency_s: float  # end-to-end
    stream: bool = False
    student_model: str | None = None  # the student's model reference/version string
    fallback_reason: str | None = None  # None | "low_confidence" | "timeout" | "connection" | ...
    confidence: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    user_hash: str | None = None  # hex digest of the user key, never the raw user
    prompt: str | None = None  # JSON text of the messages (chat) or the prompt (completions)
    answer: str | None = None  # text returned to the client
    student_answer: str | None = None  # the student's answer when the teacher replaced it
    error: str | None = None  # short error message when status >= 400
    # Tokens the student generated before the teacher replaced its answer (a fallback pays for
    # both); None when nothing was replaced or the count is unknown.
    student_completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    """The teacher's log-probabilities of the student's answer tokens (for divergence/drift)."""

    request_id: str
    ts: float
    student_model: str | None
    token_ids: tuple[int, ...]  # the student's answer tokens
    student_logprobs: tuple[float, ...]  # the student's log-prob of each of its tokens
    teacher_logprobs: tuple[float, ...]  # the teacher's log-prob of the same tokens
    student_top: tuple[dict[int, float], ...] | None = None  # per token: top-k {token_id: logprob}
    teacher_top: tuple[dict[int, float], ...] | None = None


@dataclass(frozen=True, slots=True)
class AbChange:
    """One change of the A/B split (audit trail)."""

    ts: float
    share: float
    seed: str
    previous_share: float
    previous_seed: str
    actor: str  # e.g. "admin-api" or "config"


TrafficItem = TrafficRecord | ShadowRecord | AbChange

_REQUEST_COLUMNS = (
    "request_id",
    "ts",
    "endpoint",
    "arm",
    "served_by",
    "status",
    "latency_s",
    "stream",
    "student_model",
    "fallback_reason",
    "confidence",
    "ttft_s",
    "prompt_tokens",
    "completion_tokens",
    "user_hash",
    "prompt",
    "answer",
    "student_answer",
    "error",
    "student_completion_tokens",
)
_SHADOW_COLUMNS = (
    "request_id",
    "ts",
    "student_model",
    "token_ids",
    "student_logprobs",
    "teacher_logprobs",
    "student_top",
    "teacher_top",
)
_AB_COLUMNS = ("ts", "share", "seed", "previous_share", "previous_seed", "actor")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL, ts REAL NOT NULL, endpoint TEXT NOT NULL, arm TEXT NOT NULL,
    served_by TEXT NOT NULL, status INTEGER NOT NULL, latency_s REAL NOT NULL,
    stream INTEGER NOT NULL, student_model TEXT, fallback_reason TEXT, confidence REAL,
    ttft_s REAL, prompt_tokens INTEGER, completion_tokens INTEGER, user_hash TEXT, prompt TEXT,
    answer TEXT, student_answer TEXT, error TEXT, student_completion_tokens INTEGER
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts, seq);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id);
CREATE TABLE IF NOT EXISTS shadow (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL, ts REAL NOT NULL, student_model TEXT, token_ids TEXT NOT NULL,
    student_logprobs TEXT NOT NULL, teacher_logprobs TEXT NOT NULL, student_top TEXT,
    teacher_top TEXT
);
CREATE INDEX IF NOT EXISTS shadow_ts ON shadow (ts, seq);
CREATE INDEX IF NOT EXISTS shadow_request_id ON shadow (request_id);
CREATE TABLE IF NOT EXISTS ab_changes (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL, share REAL NOT NULL, seed TEXT NOT NULL, previous_share REAL NOT NULL,
    previous_seed TEXT NOT NULL, actor TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


INSERT_SQL: dict[type, str] = {
    TrafficRecord: _insert_sql("requests", _REQUEST_COLUMNS),
    ShadowRecord: _insert_sql("shadow", _SHADOW_COLUMNS),
    AbChange: _insert_sql("ab_changes", _AB_COLUMNS),
}
"""The INSERT statement for each item type; its parameters are `to_row(item)`."""


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables if missing (idempotent); refuse a log written by a newer schema."""
    version = _schema_version(conn)
    if version is not None and version > SCHEMA_VERSION:
        raise TrafficLogError(
            f"traffic log has schema version {version}, this Stillhouse knows up to "
            f"{SCHEMA_VERSION}: upgrade Stillhouse or point it at a new log"
        )
    conn.executescript(_SCHEMA)
    if version == 1:  # 1 -> 2: one nullable column, old rows read it as None
        with conn:
            conn.execute("ALTER TABLE requests ADD COLUMN student_completion_tokens INTEGER")
            conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def _schema_version(conn: sqlite3.Connection) -> int | None:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def _dumps(value: Any) -> str:
    # NaN/-Infinity stay representable (a log-prob can be -inf); json.loads reads them back.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _dumps_top(top: tuple[dict[int, float], ...] | None) -> str | None:
    return None if top is None else _dumps([{str(k): v for k, v in d.items()} for d in top])


def _loads_top(text: str | None) -> tuple[dict[int, float], ...] | None:
    if text is None:
        return None
    return tuple({int(k): float(v) for k, v in d.items()} for d in json.loads(text))


def to_row(item: TrafficItem) -> tuple[Any, ...]:
    """The parameters of `INSERT_SQL[type(item)]`. Raises TypeError for any other object."""
    if isinstance(item, TrafficRecord):
        return tuple(
            int(item.stream) if name == "stream" else getattr(item, name)
            for name in _REQUEST_COLUMNS
        )
    if isinstance(item, ShadowRecord):
        return (
            item.request_id,
            item.ts,
            item.student_model,
            _dumps(list(item.token_ids)),
            _dumps(list(item.student_logprobs)),
            _dumps(list(item.teacher_logprobs)),
            _dumps_top(item.student_top),
            _dumps_top(item.teacher_top),
        )
    if isinstance(item, AbChange):
        return tuple(getattr(item, name) for name in _AB_COLUMNS)
    raise TypeError(f"not a traffic log item: {type(item).__name__}")


def _record_from_row(row: sqlite3.Row) -> TrafficRecord:
    present = row.keys()  # a version-1 log has no student_completion_tokens column
    values = {name: row[name] if name in present else None for name in _REQUEST_COLUMNS}
    values["stream"] = bool(values["stream"])
    return TrafficRecord(**values)


def _shadow_from_row(row: sqlite3.Row) -> ShadowRecord:
    return ShadowRecord(
        request_id=row["request_id"],
        ts=row["ts"],
        student_model=row["student_model"],
        token_ids=tuple(json.loads(row["token_ids"])),
        student_logprobs=tuple(json.loads(row["student_logprobs"])),
        teacher_logprobs=tuple(json.loads(row["teacher_logprobs"])),
        student_top=_loads_top(row["student_top"]),
        teacher_top=_loads_top(row["teacher_top"]),
    )


class TrafficLogReader:
    """Read-only access to a traffic log, safe while a writer has it open. Every query runs in
    its own read transaction, so each call sees everything committed before it started."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TrafficLogError(f"traffic log not found: {self.path}")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            # check_same_thread=False: eval may hand a reader to a worker thread; the sqlite3
            # module serializes access to one connection.
            self._conn = sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            version = _schema_version(self._conn)
        except sqlite3.Error as exc:
            raise TrafficLogError(f"cannot read traffic log {self.path}: {exc}") from exc
        if version is None or version > SCHEMA_VERSION:
            self._conn.close()
            found = "no traffic log schema" if version is None else f"schema version {version}"
            raise TrafficLogError(
                f"{self.path} is not a readable traffic log ({found}; "
                f"this Stillhouse reads version {SCHEMA_VERSION})"
            )

    def _query(self, sql: str, params: list[Any]) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise TrafficLogError(f"cannot read traffic log {self.path}: {exc}") from exc

    @staticmethod
    def _window(
        since: float | None, until: float | None, limit: int | None, extra: dict[str, Any]
    ) -> tuple[str, list[Any]]:
        """WHERE/ORDER/LIMIT for `since <= ts < until` plus equality filters."""
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("ts >= ?")
            params.append(since)
        if until is not None:
            clauses.append("ts < ?")
            params.append(until)
        for column, value in extra.items():
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        sql = (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY ts, seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        return sql, params

    def records(
        self,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        arm: str | None = None,
    ) -> list[TrafficRecord]:
        """Requests with `since <= ts < until` (either bound optional), oldest first."""
        where, params = self._window(since, until, limit, {"arm": arm})
        rows = self._query(f"SELECT * FROM requests{where}", params)
        return [_record_from_row(row) for row in rows]

    def shadow(
        self, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[ShadowRecord]:
        """Shadow scores with `since <= ts < until`, oldest first."""
        where, params = self._window(since, until, limit, {})
        return [
            _shadow_from_row(row) for row in self._query(f"SELECT * FROM shadow{where}", params)
        ]

    def ab_changes(self) -> list[AbChange]:
        """Every A/B split change, oldest first."""
        rows = self._query("SELECT * FROM ab_changes ORDER BY ts, seq", [])
        return [AbChange(**{name: row[name] for name in _AB_COLUMNS}) for row in rows]

    def count(self) -> int:
        """The number of request records."""
        return int(self._query("SELECT count(*) FROM requests", [])[0][0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> TrafficLogReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
