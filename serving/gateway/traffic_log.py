"""The gateway's durable traffic log writer: SQLite in WAL mode, group commits off the hot path.

    writer = TrafficLogWriter(settings.traffic_log_path, flush_interval_s=0.2, strict=False)
    writer.start()                          # opens the DB; raises TrafficLogError if it cannot
    fut = writer.submit(record)             # never blocks; from any thread, the event loop included
    await asyncio.wrap_future(fut)          # strict mode only: answer after the commit
    writer.close()                          # commits what is pending

One daemon thread owns the connection and commits everything queued in one transaction. Group
mode commits at most every `flush_interval_s`; strict mode as soon as anything is queued,
fsynced before the futures resolve. What a crash loses in each: docs/gateway.md.

What waits is bounded by count (`max_pending`) and by size (`max_pending_bytes`); past either a
record is dropped. Every lost record (dropped, or in a failed commit) is counted one for one
(`on_lost`) and summed up in one log line per `loss_log_interval_s`. Records older than
`retention_days` are deleted once an hour (and at start), and the freed pages returned.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from stillhouse.common.traffic import (
    INSERT_SQL,
    AbChange,
    ShadowRecord,
    TrafficItem,
    TrafficLogError,
    TrafficRecord,
    create_schema,
    to_row,
)

log = logging.getLogger(__name__)

_Entry = tuple[TrafficItem, "Future[None]", int]  # the item, its future, its size estimate
PRUNE_INTERVAL_S = 3600.0
_RECORD_OVERHEAD_BYTES = 512  # the fixed fields of a record, roughly, on top of its texts
# Errors that come from one item's values, not from the database: retry item by item.
_SQLITE_DATA_ERRORS = (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.IntegrityError)
_DATA_ERRORS = (OverflowError, TypeError, ValueError, *_SQLITE_DATA_ERRORS)


class TrafficLogFullError(TrafficLogError):
    """More than `max_pending` records were waiting for the writer; this one was dropped."""


class TrafficLogWriter:
    """Thread-safe, non-blocking writer of the traffic log (see the module docstring).

    `on_commit(n, seconds)` and `on_error(exc)` run on the writer thread, except that a
    `TrafficLogFullError` is reported on the thread that called `submit`; keep them quick and
    thread-safe (Prometheus counters are). An exception they raise is logged, never propagated.
    """

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = 0.2,
        strict: bool = False,
        on_commit: Callable[[int, float], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
        max_pending: int = 100_000,
        max_pending_bytes: int = 64 << 20,
        retention_days: float = 0.0,
        loss_log_interval_s: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.strict = strict
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.retention_days = retention_days  # 0: keep forever
        self.loss_log_interval_s = loss_log_interval_s
        self._on_commit = on_commit
        self._on_error = on_error
        self._on_lost = on_lost
        self._cond = threading.Condition()
        self._queue: deque[_Entry] = deque()
        self._pending = 0  # queued + the batch being written
        self._pending_bytes = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lost_since_log = 0
        self._last_loss_log = -math.inf
        self._last_prune = -math.inf

    @property
    def pending(self) -> int:
        """Items submitted but not yet committed: the records a crash now would lose."""
        return self._pending

    def start(self) -> None:
        """Open the log (creating its folder and schema) on a new writer thread; raises
        TrafficLogError if the database cannot be opened."""
        with self._cond:
            if self._closed:
                raise RuntimeError("traffic log writer is closed")
            if self._thread is not None:
                return
            opened: Future[None] = Future()
            self._thread = threading.Thread(
                target=self._run, args=(opened,), name="traffic-log-writer", daemon=True
            )
        self._thread.start()
        try:
            opened.result()  # re-raises the thread's open error here, in the caller
        except BaseException:
            self._thread = None
            raise

    def submit(self, item: TrafficItem) -> Future[None]:
        """Queue `item`; the future resolves once its batch is committed, or fails with the
        commit's error (TrafficLogFullError when the queue is full). Never blocks."""
        if not isinstance(item, TrafficRecord | ShadowRecord | AbChange):
            raise TypeError(f"not a traffic log item: {type(item).__name__}")
        fut: Future[None] = Future()
        # RUNNING: asyncio.wrap_future's cancellation (a client hang-up) cannot cancel it.
        fut.set_running_or_notify_cancel()
        size = item_bytes(item)
        with self._cond:
            if self._closed:
                raise RuntimeError("traffic log writer is closed")
            full = (
                self._pending >= self.max_pending
                or self._pending_bytes + size > self.max_pending_bytes
            )
            if not full:
                self._queue.append((item, fut, size))
                self._pending += 1
                self._pending_bytes += size
                self._cond.notify()
        if full:
            exc = TrafficLogFullError(
                f"traffic log queue is full ({self._pending} records, {self._pending_bytes} "
                f"bytes waiting): record dropped; is {self.path} writable and fast enough?"
            )
            fut.set_exception(exc)
            self._report_error(exc)
            self._lost(1, exc)
        return fut

    def close(self, timeout: float = 5.0) -> None:
        """Commit everything pending, stop the thread, close the database. Idempotent."""
        with self._cond:
            if self._closed:
                return
            never_started = self._thread is None and bool(self._queue)
        if never_started:
            try:
                self.start()
            except Exception as exc:  # nothing can write them: fail them rather than hang
                self._fail_unstarted(exc)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "traffic log writer did not finish within %.1fs; %d records not committed",
                    timeout,
                    self._pending,
                )

    def _fail_unstarted(self, exc: BaseException) -> None:
        with self._cond:
            entries = list(self._queue)
            self._queue.clear()
            self._pending = self._pending_bytes = 0
        for _, fut, _ in entries:
            _resolve(fut, exc)
        self._report_error(exc)
        self._lost(len(entries), exc)

    # --- the writer thread ---------------------------------------------------------------

    def _run(self, opened: Future[None]) -> None:
        try:
            conn = self._open()
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            last_flush = float("-inf")
            self._maybe_prune(conn)
            while (batch := self._next_batch(last_flush)) is not None:
                last_flush = time.monotonic()
                self._write(conn, batch)
                self._maybe_prune(conn)
        finally:
            conn.close()

    def _maybe_prune(self, conn: sqlite3.Connection) -> None:
        """Delete what is older than the retention, at most once per PRUNE_INTERVAL_S."""
        now = time.monotonic()
        if self.retention_days <= 0 or now - self._last_prune < PRUNE_INTERVAL_S:
            return
        self._last_prune = now
        try:
            deleted = prune(conn, time.time() - self.retention_days * 86400)
        except sqlite3.Error as exc:
            log.warning("traffic log: pruning past %g days failed: %s", self.retention_days, exc)
            return
        if deleted:
            log.info("traffic log: deleted %d records past %g days", deleted, self.retention_days)

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are the explicit BEGIN/COMMIT in _write.
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            # A new database returns the pages that retention frees (prune); an old one
            # reuses them.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                conn.close()
                raise TrafficLogError(f"traffic log {self.path}: WAL mode unavailable ({mode})")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.strict else 'NORMAL'}")
            create_schema(conn)
        except (OSError, sqlite3.Error) as exc:
            raise TrafficLogError(f"cannot open traffic log {self.path}: {exc}") from exc
        return conn

    def _next_batch(self, last_flush: float) -> list[_Entry] | None:
        """Wait for work (group mode: and for the next flush slot); None once closed and empty."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self.strict:
                # Take nothing before the slot opens, unless close() asks for a final flush.
                while (
                    not self._closed
                    and (wait := last_flush + self.flush_interval_s - time.monotonic()) > 0
                ):
                    self._cond.wait(wait)
            if not self._queue:
                return None
            batch = list(self._queue)
            self._queue.clear()
            return batch

    def _write(self, conn: sqlite3.Connection, batch: list[_Entry]) -> None:
        started = time.perf_counter()
        try:
            failed = self._insert(conn, batch)
        except Exception as exc:  # the database failed (disk full, I/O error): the batch is lost
            self._settle(batch, {}, exc)
        else:
            self._settle(batch, failed, None, time.perf_counter() - started)

    def _insert(self, conn: sqlite3.Connection, batch: list[_Entry]) -> dict[int, BaseException]:
        """Insert and commit the batch in one transaction; returns the items refused for bad
        values (by index). Raises when the transaction itself fails."""
        by_sql: dict[str, list[tuple[object, ...]]] = {}
        failed: dict[int, BaseException] = {}
        for i, (item, _, _) in enumerate(batch):
            try:
                by_sql.setdefault(INSERT_SQL[type(item)], []).append(to_row(item))
            except Exception as exc:
                failed[i] = exc
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in by_sql.items():
                    conn.executemany(sql, rows)
            except _DATA_ERRORS:
                # One bad value must not cost the whole batch: redo it row by row.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                for i, (item, _, _) in enumerate(batch):
                    if i not in failed:
                        try:
                            conn.execute(INSERT_SQL[type(item)], to_row(item))
                        except _DATA_ERRORS as exc:
                            failed[i] = exc
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT may already have rolled back
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("traffic log rollback failed")
            raise
        return failed

    def _settle(
        self,
        batch: list[_Entry],
        failed: dict[int, BaseException],
        error: BaseException | None,
        seconds: float = 0.0,
    ) -> None:
        with self._cond:
            self._pending -= len(batch)
            self._pending_bytes -= sum(size for _, _, size in batch)
        committed = 0 if error is not None else len(batch) - len(failed)
        if committed and self._on_commit is not None:
            try:
                self._on_commit(committed, seconds)
            except Exception:
                log.exception("traffic log on_commit callback failed")
        for exc in ([error] if error is not None else []) + list(failed.values()):
            self._report_error(exc)
        lost = len(batch) if error is not None else len(failed)
        if lost:
            self._lost(lost, error or next(iter(failed.values())))
        for i, (_, fut, _) in enumerate(batch):
            _resolve(fut, error if error is not None else failed.get(i))

    def _report_error(self, exc: BaseException) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(exc)
        except Exception:
            log.exception("traffic log on_error callback failed")

    def _lost(self, n: int, exc: BaseException) -> None:
        """`n` records will never be in the log: counted one for one, logged once per
        interval (a full disk must not also fill the error log)."""
        if self._on_lost is not None:
            try:
                self._on_lost(n)
            except Exception:
                log.exception("traffic log on_lost callback failed")
        with self._cond:
            self._lost_since_log += n
            now = time.monotonic()
            if now - self._last_loss_log < self.loss_log_interval_s:
                return
            lost, self._lost_since_log, self._last_loss_log = self._lost_since_log, 0, now
        log.error("traffic log: %d records lost since the last report; last error: %s", lost, exc)


def item_bytes(item: TrafficItem) -> int:
    """A record's size, roughly: its texts plus a fixed overhead (the byte budget's unit)."""
    if isinstance(item, TrafficRecord):
        texts = (item.prompt, item.answer, item.student_answer, item.error)
        return _RECORD_OVERHEAD_BYTES + sum(len(t) for t in texts if t)
    if isinstance(item, ShadowRecord):
        return _RECORD_OVERHEAD_BYTES + 64 * len(item.token_ids)
    return _RECORD_OVERHEAD_BYTES


def prune(conn: sqlite3.Connection, before_ts: float) -> int:
    """Delete requests and shadow scores older than `before_ts` (the A/B changes stay: they
    are few, and the sample-ratio check needs the share in force); returns how many."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        deleted = conn.execute("DELETE FROM requests WHERE ts < ?", (before_ts,)).rowcount
        deleted += conn.execute("DELETE FROM shadow WHERE ts < ?", (before_ts,)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if deleted:
        # executescript steps it to the end (execute() would free one page per call)
        conn.executescript("PRAGMA incremental_vacuum;")
    return deleted


def _resolve(fut: Future[None], exc: BaseException | None) -> None:
    # Only the writer settles these futures, and they are RUNNING, so nobody else can.
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
