"""The durable traffic log: round trips through writer and reader, group and strict commits,
batching, back-pressure without blocking, failure handling, reader filters, and `kill -9`
durability (a writer in a child process killed mid-stream)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stillhouse.common.errors import StillhouseError
from stillhouse.common.traffic import (
    SCHEMA_VERSION,
    AbChange,
    ShadowRecord,
    TrafficLogError,
    TrafficLogReader,
    TrafficRecord,
    create_schema,
)
from stillhouse.serving.gateway.traffic_log import TrafficLogFullError, TrafficLogWriter

HERE = Path(__file__).resolve().parent
KILL_FLUSH_S = 0.2


def make_record(i: int, **changes: object) -> TrafficRecord:
    """A deterministic, fully populated record (the child process builds the same ones)."""
    fields: dict[str, object] = {
        "request_id": f"req-{i:07d}",
        "ts": 1_700_000_000.0 + i * 0.001,
        "endpoint": "chat" if i % 2 else "completions",
        "arm": "challenger" if i % 3 == 0 else "champion",
        "served_by": "teacher" if i % 5 == 0 else "champion",
        "status": 200,
        "latency_s": 0.05 + i * 1e-6,
        "stream": i % 2 == 0,
        "student_model": "models:/stillhouse-student/3",
        "fallback_reason": "low_confidence" if i % 5 == 0 else None,
        "confidence": 0.5 + (i % 100) / 1000,
        "ttft_s": 0.01,
        "prompt_tokens": 40 + i % 7,
        "completion_tokens": 12,
        "user_hash": f"{i:064x}",
        # Long enough to span database pages, so a torn write would show.
        "prompt": f'[{{"role": "user", "content": "Rechnung doppelt — ✓ 請求 {i} {"x" * 1500}"}}]',
        "answer": f"category: billing 💸 {i}",
        "student_answer": "category: shipping" if i % 5 == 0 else None,
        "error": None,
    }
    fields.update(changes)
    return TrafficRecord(**fields)  # type: ignore[arg-type]


def child_main(path: str, mode: str) -> None:
    """Run in a child process: write records until killed, printing ids to stdout.

    group: prints `<i> <monotonic time>` right after each submit (submitted, maybe not committed).
    strict: four threads print `<i>` only after the record's future resolved (committed)."""
    writer = TrafficLogWriter(Path(path), flush_interval_s=KILL_FLUSH_S, strict=mode == "strict")
    writer.start()
    if mode == "group":
        for i in itertools.count():
            writer.submit(make_record(i))
            print(i, time.monotonic(), flush=True)
            time.sleep(0.001)
    ids = itertools.count()
    lock = threading.Lock()

    def ack_loop() -> None:
        while True:
            with lock:
                i = next(ids)
            writer.submit(make_record(i)).result()
            with lock:
                print(i, flush=True)

    threads = [threading.Thread(target=ack_loop, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    threads[0].join()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "traffic.db"


@pytest.fixture
def writer_factory(db: Path) -> Iterator:
    writers: list[TrafficLogWriter] = []

    def make(**kwargs: object) -> TrafficLogWriter:
        writer = TrafficLogWriter(db, **kwargs)  # type: ignore[arg-type]
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close()


def rows_in(db: Path) -> int:
    with TrafficLogReader(db) as reader:
        return reader.count()


def wait_for(predicate, timeout: float) -> float:
    """Seconds until `predicate()` was true; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.005)
    return time.monotonic() - start


# --- round trip and reader ---------------------------------------------------------------------


def test_round_trip_keeps_every_field_of_all_three_types(writer_factory, db):
    sparse = TrafficRecord("req-b", 2.0, "completions", "champion", "none", 502, 1.5, error="é")
    shadow = ShadowRecord(
        request_id="req-a",
        ts=1.5,
        student_model=None,
        token_ids=(5, 17, 900),
        student_logprobs=(-0.1, -2.5, -math.inf),
        teacher_logprobs=(-0.2, -0.01, -7.0),
        student_top=({5: -0.1, 6: -3.0}, {17: -2.5}, {900: -math.inf, 1: -0.5}),
        teacher_top=None,
    )
    change = AbChange(ts=3.0, share=0.25, seed="exp-2", previous_share=0.05, previous_seed="e1",
                      actor="admin-api")  # fmt: skip
    full = make_record(1, ts=1.0, request_id="req-a")
    writer = writer_factory()
    writer.start()
    futures = [writer.submit(item) for item in (sparse, full, shadow, change)]
    writer.close()
    assert [f.result(timeout=0) for f in futures] == [None] * 4
    with TrafficLogReader(db) as reader:
        assert reader.records() == [full, sparse]  # ordered by ts
        [back] = reader.shadow()
        assert back == shadow
        assert all(type(k) is int for top in back.student_top or () for k in top)
        assert reader.ab_changes() == [change]
        assert reader.count() == 2


def test_duplicate_request_ids_are_both_kept(writer_factory, db):
    writer = writer_factory()
    writer.start()
    writer.submit(make_record(1)).result(timeout=5)
    writer.submit(make_record(1, status=500)).result(timeout=5)
    with TrafficLogReader(db) as reader:
        assert [r.status for r in reader.records()] == [200, 500]


def test_reader_filters_by_since_until_arm_and_limit_in_ts_then_insertion_order(writer_factory, db):
    ts_arm = [(5.0, "champion"), (1.0, "challenger"), (3.0, "champion"), (3.0, "challenger"),
              (9.0, "challenger")]  # fmt: skip
    writer = writer_factory()
    writer.start()
    for i, (ts, arm) in enumerate(ts_arm):
        writer.submit(make_record(i, ts=ts, arm=arm))
        writer.submit(ShadowRecord(f"s{i}", ts, "m", (1,), (-1.0,), (-1.0,)))
    writer.close()
    with TrafficLogReader(db) as reader:
        ids = lambda records: [r.request_id[-1] for r in records]  # noqa: E731
        assert ids(reader.records()) == ["1", "2", "3", "0", "4"]
        assert ids(reader.records(since=3.0, until=9.0)) == ["2", "3", "0"]  # since <= ts < until
        assert ids(reader.records(arm="challenger")) == ["1", "3", "4"]
        assert ids(reader.records(since=2.0, arm="challenger", limit=1)) == ["3"]
        assert ids(reader.records(limit=0)) == []
        assert ids(reader.shadow(since=3.0, limit=2)) == ["2", "3"]
        assert ids(reader.shadow(until=3.0)) == ["1"]


def test_reader_on_a_missing_path_raises_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "traffic.db"
    with pytest.raises(TrafficLogError) as info:
        TrafficLogReader(missing)
    assert isinstance(info.value, StillhouseError) and info.value.exit_code == 1
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    assert not missing.parent.exists()  # the reader never creates anything


@pytest.mark.parametrize("content", [b"not a database at all" * 100, None])
def test_reader_refuses_a_file_that_is_not_a_traffic_log(tmp_path, content):
    path = tmp_path / "other.db"
    if content is None:
        sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    else:
        path.write_bytes(content)
    with pytest.raises(TrafficLogError, match=r"other\.db"):
        TrafficLogReader(path)


def test_create_schema_is_idempotent_and_refuses_a_newer_version(tmp_path):
    conn = sqlite3.connect(tmp_path / "t.db")
    create_schema(conn)
    create_schema(conn)
    assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
    conn.execute("UPDATE meta SET value = ?", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    with pytest.raises(TrafficLogError, match="schema version"):
        create_schema(conn)
    conn.close()
    with pytest.raises(TrafficLogError, match="schema version"):
        TrafficLogReader(tmp_path / "t.db")


def test_a_version_1_log_is_migrated_and_its_old_rows_read_the_new_column_as_none(tmp_path):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    create_schema(conn)
    # Turn it back into a version-1 log: no student_completion_tokens column.
    conn.execute("ALTER TABLE requests DROP COLUMN student_completion_tokens")
    conn.execute("UPDATE meta SET value = '1'")
    conn.execute(
        "INSERT INTO requests (request_id, ts, endpoint, arm, served_by, status, latency_s, "
        "stream) VALUES ('old', 1.0, 'chat', 'champion', 'teacher', 200, 0.1, 0)"
    )
    conn.commit()
    with TrafficLogReader(path) as reader:  # a reader never writes: it reads v1 as it is
        (old,) = reader.records()
    assert old.request_id == "old" and old.student_completion_tokens is None
    create_schema(conn)  # what the writer does on open
    assert conn.execute("SELECT value FROM meta").fetchall() == [("2",)]
    conn.execute("UPDATE requests SET student_completion_tokens = 7")
    conn.commit()
    conn.close()
    with TrafficLogReader(path) as reader:
        (old,) = reader.records()
    assert old.student_completion_tokens == 7


# --- commit modes ------------------------------------------------------------------------------


def test_group_mode_record_is_visible_within_a_flush_interval_and_pending_drops(writer_factory, db):
    writer = writer_factory(flush_interval_s=0.5)
    writer.start()
    writer.submit(make_record(0)).result(timeout=5)  # the next slot opens 0.5 s after this batch
    with TrafficLogReader(db) as reader:  # a reader open alongside the writer
        future = writer.submit(make_record(1))
        assert writer.pending == 1
        assert not future.done()  # group mode waits for the next slot
        waited = wait_for(lambda: reader.count() == 2, timeout=5)
        assert waited < 0.5 + 0.5
        future.result(timeout=1)
        wait_for(lambda: writer.pending == 0, timeout=1)


def test_strict_mode_resolves_only_after_the_row_is_readable_elsewhere(writer_factory, db):
    writer = writer_factory(strict=True, flush_interval_s=5.0)  # strict ignores the interval
    writer.start()
    seen_in_callback: list[int] = []
    checked = threading.Event()

    def check(_) -> None:  # runs on the writer thread the moment the future resolves
        seen_in_callback.append(rows_in(db))
        checked.set()

    start = time.monotonic()
    future = writer.submit(make_record(0))
    future.add_done_callback(check)
    future.result(timeout=5)
    assert time.monotonic() - start < 2.0
    assert checked.wait(5) and seen_in_callback == [1]
    assert rows_in(db) == 1
    assert writer.pending == 0


def test_many_quick_submits_are_grouped_into_few_commits(writer_factory, db):
    commits: list[tuple[int, float]] = []
    writer = writer_factory(flush_interval_s=0.2, on_commit=lambda n, s: commits.append((n, s)))
    writer.start()
    futures = [writer.submit(make_record(i)) for i in range(500)]
    for future in futures:
        future.result(timeout=5)
    assert sum(n for n, _ in commits) == 500
    assert len(commits) <= 10, commits
    assert all(seconds >= 0 for _, seconds in commits)
    assert rows_in(db) == 500


def test_close_commits_pending_items_at_once_and_submit_after_close_raises(writer_factory, db):
    writer = writer_factory(flush_interval_s=30.0)
    writer.start()
    writer.submit(make_record(0)).result(timeout=5)  # the next slot is now 30 s away
    futures = [writer.submit(make_record(i)) for i in range(1, 50)]
    start = time.monotonic()
    writer.close()
    assert time.monotonic() - start < 2.0
    assert all(f.done() and f.exception() is None for f in futures)
    assert rows_in(db) == 50 and writer.pending == 0
    writer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(make_record(99))


def test_close_without_start_still_commits_what_was_submitted(writer_factory, db):
    writer = writer_factory()
    future = writer.submit(make_record(0))
    writer.close()
    assert future.result(timeout=0) is None
    assert rows_in(db) == 1


# --- back-pressure and failures ----------------------------------------------------------------


def test_full_queue_fails_the_future_and_reports_it_without_blocking(writer_factory, db):
    errors: list[BaseException] = []
    writer = writer_factory(max_pending=2, on_error=errors.append)  # thread not started
    kept = [writer.submit(make_record(i)) for i in range(2)]
    start = time.monotonic()
    dropped = writer.submit(make_record(2))
    assert time.monotonic() - start < 0.05
    assert isinstance(dropped.exception(timeout=0), TrafficLogFullError)
    assert len(errors) == 1 and isinstance(errors[0], TrafficLogFullError)
    assert writer.pending == 2
    writer.start()
    writer.close()
    assert [f.exception(timeout=0) for f in kept] == [None, None]
    assert rows_in(db) == 2


def test_full_queue_while_the_writer_thread_is_stuck_drops_new_records(writer_factory, db):
    release = threading.Event()
    errors: list[BaseException] = []
    writer = writer_factory(
        flush_interval_s=0.01, max_pending=3, on_error=errors.append,
        on_commit=lambda n, s: release.wait(10),
    )  # fmt: skip
    writer.start()
    writer.submit(make_record(0))  # its commit callback blocks the writer thread
    wait_for(lambda: writer.pending == 0, timeout=5)
    kept = [writer.submit(make_record(i)) for i in range(1, 4)]
    dropped = writer.submit(make_record(4))
    assert isinstance(dropped.exception(timeout=0), TrafficLogFullError)
    assert writer.pending == 3 and len(errors) == 1
    release.set()
    for future in kept:
        future.result(timeout=5)
    assert rows_in(db) == 4


def test_failed_batch_fails_its_futures_reports_and_the_writer_keeps_going(writer_factory, db):
    errors: list[BaseException] = []
    writer = writer_factory(strict=True, on_error=errors.append)
    writer.start()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("DROP TABLE ab_changes")  # the next insert into it must fail
    change = AbChange(1.0, 0.1, "s", 0.0, "s", "config")
    failed = writer.submit(change)
    assert isinstance(failed.exception(timeout=5), sqlite3.OperationalError)
    assert len(errors) == 1 and errors[0] is failed.exception()
    assert writer.pending == 0
    create_schema(other)
    other.close()
    writer.submit(change).result(timeout=5)
    writer.submit(make_record(0)).result(timeout=5)
    with TrafficLogReader(db) as reader:
        assert reader.ab_changes() == [change] and reader.count() == 1


def test_a_record_with_an_unstorable_value_fails_alone_not_its_whole_batch(writer_factory, db):
    errors: list[BaseException] = []
    writer = writer_factory(on_error=errors.append)
    good = [writer.submit(make_record(i)) for i in range(3)]
    bad = writer.submit(make_record(3, status=2**70))  # beyond SQLite's 64-bit integers
    good.append(writer.submit(make_record(4)))
    writer.start()  # all five go into the first batch
    writer.close()
    assert isinstance(bad.exception(timeout=0), OverflowError)
    assert [f.exception(timeout=0) for f in good] == [None] * 4
    assert errors == [bad.exception()]
    assert rows_in(db) == 4


def test_start_on_an_unopenable_path_raises_traffic_log_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    writer = TrafficLogWriter(blocker / "traffic.db")
    with pytest.raises(TrafficLogError, match=r"traffic\.db"):
        writer.start()
    writer.close()


def test_submit_rejects_objects_that_are_not_log_items(writer_factory):
    with pytest.raises(TypeError, match="dict"):
        writer_factory().submit({"request_id": "x"})


# --- kill -9 durability ------------------------------------------------------------------------


def run_and_kill(db: Path, mode: str, out: Path, run_s: float = 1.5) -> list[str]:
    """Start a writer child, let it write for `run_s` after its first id, SIGKILL its process
    group, and return its complete stdout lines."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import test_traffic_log as t; t.child_main(sys.argv[2], sys.argv[3])"
    )
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(HERE), str(db), mode],
            stdout=stdout,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while out.stat().st_size == 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"child failed: {proc.communicate()[1].decode()}")
                time.sleep(0.01)
            time.sleep(run_s)
            assert proc.poll() is None, proc.communicate()[1].decode()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    text = out.read_text()
    return text.splitlines()[:-1] if not text.endswith("\n") else text.splitlines()


def assert_intact(db: Path) -> list[TrafficRecord]:
    """The log opens read-only after the crash, passes integrity_check, and every row parses
    into exactly the record the child built."""
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    with TrafficLogReader(db) as reader:
        records = reader.records()
    for record in records:
        assert record == make_record(int(record.request_id.removeprefix("req-")))
    return records


def test_kill_9_in_group_mode_loses_at_most_about_one_flush_interval(tmp_path):
    db = tmp_path / "traffic.db"
    lines = run_and_kill(db, "group", tmp_path / "submitted.txt")
    submitted = [int(line.split()[0]) for line in lines]
    times = [float(line.split()[1]) for line in lines]
    assert submitted == list(range(len(submitted)))
    assert len(submitted) > 100, "the child wrote too little to test anything"
    rate = (len(submitted) - 1) / (times[-1] - times[0])
    committed = [int(r.request_id.removeprefix("req-")) for r in assert_intact(db)]
    # An exact prefix of the submit order (one more than printed: killed before its print).
    assert committed == list(range(len(committed)))
    assert len(committed) <= len(submitted) + 1
    missing = len(submitted) - len(committed)
    allowed = KILL_FLUSH_S * rate * 2 + 20
    assert missing <= allowed, f"lost {missing} records; allowed {allowed:.0f} at {rate:.0f}/s"


def test_kill_9_in_strict_mode_loses_no_acknowledged_record(tmp_path):
    db = tmp_path / "traffic.db"
    acknowledged = {int(line) for line in run_and_kill(db, "strict", tmp_path / "acked.txt")}
    assert len(acknowledged) > 20, "the child acknowledged too little to test anything"
    committed = {int(r.request_id.removeprefix("req-")) for r in assert_intact(db)}
    assert acknowledged - committed == set()
    assert len(committed - acknowledged) <= 4  # at most the in-flight one per child thread


# --- bounds, loss accounting and retention ---------------------------------------------------


def test_the_queue_is_bounded_by_bytes_too(writer_factory, db):
    lost: list[int] = []
    writer = writer_factory(max_pending_bytes=8_000, on_lost=lost.append)  # thread not started
    kept = writer.submit(make_record(0, prompt="p" * 5_000))
    dropped = writer.submit(make_record(1, prompt="p" * 5_000))
    assert isinstance(dropped.exception(timeout=0), TrafficLogFullError)
    assert lost == [1] and writer.pending == 1
    writer.start()
    writer.close()
    assert kept.exception(timeout=0) is None and rows_in(db) == 1


def test_a_failed_commit_counts_every_record_it_loses_and_logs_once(writer_factory, db, caplog):
    lost: list[int] = []
    writer = writer_factory(flush_interval_s=0.05, on_lost=lost.append, loss_log_interval_s=60)
    writer.start()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("DROP TABLE requests")  # every insert fails now, as on a full disk
    with caplog.at_level("ERROR", logger="stillhouse.serving.gateway.traffic_log"):
        for batch in range(3):
            futures = [writer.submit(make_record(10 * batch + i)) for i in range(4)]
            for future in futures:
                assert future.exception(timeout=5) is not None
    other.close()
    assert sum(lost) == 12  # one for one, not one per batch
    assert len([r for r in caplog.records if "records lost" in r.getMessage()]) == 1


def test_records_older_than_the_retention_are_deleted_and_their_pages_freed(db):
    from stillhouse.serving.gateway.traffic_log import prune

    now = time.time()
    writer = TrafficLogWriter(db)
    writer.start()
    for i in range(200):
        age_days = 40 if i < 150 else 1
        writer.submit(make_record(i, ts=now - age_days * 86400, prompt="x" * 2000))
    writer.close()
    conn = sqlite3.connect(db, isolation_level=None)
    pages_before = conn.execute("PRAGMA page_count").fetchone()[0]
    assert prune(conn, now - 30 * 86400) == 150
    assert conn.execute("PRAGMA page_count").fetchone()[0] < pages_before / 2
    conn.close()
    assert rows_in(db) == 50
    # The writer prunes by itself at start with `retention_days`.
    TrafficLogWriter(db, retention_days=0.5).start()
    wait_for(lambda: rows_in(db) == 0, timeout=5)
