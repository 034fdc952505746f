"""The traffic log on a full disk (a small tmpfs, filled up once the gateway runs), behind a
real `stillhouse serve`: in group mode the gateway keeps answering and counts every lost record
one for one; in strict mode it refuses cleanly (503), never a 500."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import ask

pytestmark = pytest.mark.slow

REQUESTS = 60


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only: CI runs as root here; elsewhere this fails, it does not skip)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Take every free byte of `disk`."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def rows(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        conn.close()


def test_group_mode_keeps_answering_on_a_full_disk_and_counts_each_lost_record(
    faulty_gateway, small_disk
):
    db = small_disk / "traffic.db"
    gp, _ = faulty_gateway(traffic_log={"path": str(db), "flush_interval_ms": 20})
    assert ask(gp.url, stream=False).status == 200
    fill(small_disk)
    seen = [ask(gp.url, stream=i % 2 == 1) for i in range(REQUESTS)]
    assert [s.status for s in seen] == [200] * REQUESTS
    lost = gp.metric("stillhouse_traffic_log_write_errors_total")
    committed = gp.metric("stillhouse_traffic_log_records_committed_total")
    (small_disk / "filler").unlink()  # room again: the count in the file can be read
    print(f"\ndisk full (group): {REQUESTS} answered 200, lost {lost:g}, committed {committed:g}")
    assert lost > 0
    assert lost + committed == REQUESTS + 1 + 1  # + the first request, + the start's A/B change
    assert rows(db) == committed - 1
    output = gp.output()
    assert output.count("records lost since the last report") == 1
    assert "Traceback" not in output


def test_strict_mode_refuses_cleanly_on_a_full_disk(faulty_gateway, small_disk):
    db = small_disk / "traffic.db"
    gp, _ = faulty_gateway(traffic_log={"path": str(db), "sync": "strict", "strict_timeout_s": 2.0})
    assert ask(gp.url, stream=False).status == 200
    fill(small_disk)
    seen = [ask(gp.url, stream=i % 2 == 1) for i in range(10)]
    for s in seen:
        assert s.error is not None and "could not record" in s.error["message"], s
        assert s.status == 503 or (s.status == 200 and not s.done)  # a stream ends in an error
    assert all(s.seconds < 5 for s in seen)
    assert "Traceback" not in gp.output()
