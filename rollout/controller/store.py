"""The rollout controller's durable state: `<controller_dir>/controller.db` (SQLite, WAL) and the
single-instance lock `<controller_dir>/lock`.

    store = ControllerStore.open(settings.controller_dir)
    store.commit(new_state, actions, now)     # one transaction, before any action runs
    store.pending(); store.mark_done(row_id); store.decisions(version)

Write-ahead: a `kill -9` anywhere leaves either the old state and no journal rows, or the new
state with its actions pending, which a restarted controller runs again in order (every action
is idempotent). The `decisions` table doubles as the audit log. The full argument:
docs/rollout.md (Crash safety).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillhouse.common.errors import StillhouseError
from stillhouse.common.instance_lock import instance_lock
from stillhouse.rollout.controller.core import (
    ControllerAction,
    ControllerState,
    Note,
    OperatorRequest,
    Promote,
    RollBack,
    SetMirror,
    SetShare,
    action_from_dict,
    action_to_dict,
)

DB_NAME = "controller.db"
LOCK_NAME = "lock"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    version INTEGER,
    phase TEXT NOT NULL,
    step INTEGER NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    metrics TEXT NOT NULL,
    payload TEXT NOT NULL,
    done INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_pending ON decisions (done, id);
CREATE TABLE IF NOT EXISTS operator_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    command TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    taken_at REAL
);
"""


class ControllerLockedError(StillhouseError):
    """Another controller holds the lock on this controller dir."""


class ControllerStoreError(StillhouseError):
    """The controller database cannot be read; the message says how to recover."""


@dataclass(frozen=True)
class DecisionRow:
    """One journal row: an action the controller decided on, and whether it has run."""

    id: int
    ts: float
    version: int | None
    phase: str
    step: int
    action: str
    reason: str
    metrics: dict[str, float] = field(hash=False)
    payload: dict[str, Any] = field(hash=False)
    done: bool

    def to_action(self) -> ControllerAction:
        return action_from_dict(self.payload)


def _row_reason(action: ControllerAction, default: str) -> str:
    if isinstance(action, Promote | RollBack):
        return action.reason
    if isinstance(action, Note):
        return action.line
    return default


def _row_metrics(action: ControllerAction) -> dict[str, float]:
    if isinstance(action, Promote | RollBack):
        return {str(k): float(v) for k, v in action.metrics.items()}
    if isinstance(action, SetShare):
        return {"share": action.share}
    if isinstance(action, SetMirror):
        return {"mirror": action.share}
    return {}


class ControllerStore:
    """The state row and the decision journal in one SQLite file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = self.path.parent
            raise ControllerStoreError(f"cannot create {where}: {exc.strerror}") from None
        with self._connect() as db:
            # WAL: a reader (the metrics endpoint, the demo) never blocks the controller.
            db.execute("PRAGMA journal_mode=WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise ControllerStoreError(
                    f"{self.path} has schema version {version}, this Stillhouse knows "
                    f"{_SCHEMA_VERSION}; move it aside to start afresh"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @classmethod
    def open(cls, controller_dir: Path) -> ControllerStore:
        return cls(Path(controller_dir) / DB_NAME)

    @property
    def dir(self) -> Path:
        return self.path.parent

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per call: the loop may run in a thread other than the one
        # that built the store, and sqlite3 connections refuse to cross threads.
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise ControllerStoreError(f"cannot open {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
            yield db
        finally:
            db.close()

    def load(self) -> ControllerState | None:
        """The persisted state, or None before the first decision."""
        with self._connect() as db:
            row = db.execute("SELECT json FROM state WHERE id = 1").fetchone()
        if row is None:
            return None
        try:
            return ControllerState.from_json(row[0])
        except (ValueError, KeyError, TypeError) as exc:
            raise ControllerStoreError(
                f"controller state in {self.path} is unreadable ({type(exc).__name__}: {exc}); "
                "move the file aside to start afresh (the rollout restarts from calibration)"
            ) from None

    def commit(
        self,
        state: ControllerState,
        actions: Sequence[ControllerAction],
        ts: float,
        reason: str = "",
        taken: int | None = None,
    ) -> None:
        """Write `state` and journal `actions` in one transaction, every action but notes
        pending. `reason` labels the share/mirror rows (default: the state's reason); `taken`
        is the operator request this decision answers (marked taken in the same transaction)."""
        why = reason or state.reason
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if taken is not None:
                    db.execute(
                        "UPDATE operator_requests SET taken_at = ? WHERE id = ?", (ts, taken)
                    )
                db.execute(
                    "INSERT INTO state (id, json, updated_at) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET json = excluded.json, "
                    "updated_at = excluded.updated_at",
                    (state.to_json(), ts),
                )
                for action in actions:
                    version = getattr(action, "version", state.version)
                    db.execute(
                        "INSERT INTO decisions (ts, version, phase, step, action, reason, "
                        "metrics, payload, done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            ts,
                            version,
                            str(state.phase),
                            state.step,
                            action.kind,
                            _row_reason(action, why),
                            json.dumps(_row_metrics(action), sort_keys=True),
                            json.dumps(action_to_dict(action), sort_keys=True),
                            int(isinstance(action, Note)),
                        ),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def request(self, req: OperatorRequest, ts: float) -> int:
        """Queue an operator's request for the running controller (or the next one)."""
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO operator_requests (ts, command, actor, reason) VALUES (?, ?, ?, ?)",
                (ts, req.command, req.actor, req.reason),
            )
            return int(cur.lastrowid or 0)

    def waiting_request(self) -> tuple[int, OperatorRequest] | None:
        """The oldest operator request not yet taken, with its id."""
        with self._connect() as db:
            row = db.execute(
                "SELECT id, command, actor, reason FROM operator_requests "
                "WHERE taken_at IS NULL ORDER BY id LIMIT 1"
            ).fetchone()
        return None if row is None else (row[0], OperatorRequest(row[1], row[2], row[3]))

    def pending(self) -> list[DecisionRow]:
        """Journaled actions that have not (verifiably) run, oldest first."""
        return self._rows("WHERE done = 0 ORDER BY id", ())

    def mark_done(self, row_id: int) -> None:
        with self._connect() as db:
            db.execute("UPDATE decisions SET done = 1 WHERE id = ?", (row_id,))

    def decisions(self, version: int | None = None) -> list[DecisionRow]:
        """The journal, oldest first; only `version`'s rows when given."""
        if version is None:
            return self._rows("ORDER BY id", ())
        return self._rows("WHERE version = ? ORDER BY id", (version,))

    def executed_counts(self) -> list[tuple[str, int, float]]:
        """(action, count, last decision time) of the promotions and rollbacks that ran."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT action, COUNT(*), MAX(ts) FROM decisions "
                "WHERE done = 1 AND action IN ('promote', 'rollback') GROUP BY action"
            ).fetchall()
        return [(str(a), int(n), float(ts)) for a, n, ts in rows]

    def last_gate_metrics(self) -> dict[str, float]:
        """The gate numbers behind the newest executed promotion or rollback ({} if none)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT metrics FROM decisions WHERE done = 1 AND action IN ('promote', "
                "'rollback') AND metrics LIKE '%gate.status%' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return json.loads(row[0]) if row else {}

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[DecisionRow]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, ts, version, phase, step, action, reason, metrics, payload, done "
                f"FROM decisions {where}",
                args,
            ).fetchall()
        return [
            DecisionRow(
                id=r[0],
                ts=r[1],
                version=r[2],
                phase=r[3],
                step=r[4],
                action=r[5],
                reason=r[6],
                metrics=json.loads(r[7]),
                payload=json.loads(r[8]),
                done=bool(r[9]),
            )
            for r in rows
        ]


@contextlib.contextmanager
def controller_lock(controller_dir: Path) -> Iterator[Path]:
    """Hold an exclusive flock on `<controller_dir>/lock` (which records our pid) or raise
    ControllerLockedError at once: two controllers would fight over the share. The kernel drops
    the lock when the process dies (kill -9 included), so a restart never needs a manual unlock.
    The descriptor is not inherited (Python's default), so no child process keeps it.
    """
    path = Path(controller_dir) / LOCK_NAME
    with instance_lock(
        path,
        lambda who: ControllerLockedError(
            f"another rollout controller ({who}) holds {path}; one per state dir"
        ),
    ):
        yield path
