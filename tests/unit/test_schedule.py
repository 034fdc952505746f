"""`stillhouse schedule`'s core: the run-or-wait decision, the loop on a fake clock,
crash/restart semantics (at most once per slot) and the inter-process lock. Cron parsing is in
test_cron.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from schedule_helpers import SUN, WEEK, WEEKLY, utc

from stillhouse.common.errors import StillhouseError
from stillhouse.rollout.schedule import (
    MISSED_COUNT_LIMIT,
    CronSchedule,
    Plan,
    ScheduleLockedError,
    ScheduleState,
    ScheduleStateError,
    SlotOutcome,
    load_state,
    plan,
    run_scheduler,
    schedule_dir,
    schedule_lock,
    state_file,
    write_state,
)

# --- plan -------------------------------------------------------------------------------------


DAY = timedelta(days=1)
WAIT = Plan(run_now=False, slot=None, missed=0, next_at=SUN + WEEK)


@pytest.mark.parametrize(
    ("last_slot", "now", "expected"),
    [
        pytest.param(None, SUN + timedelta(hours=1), WAIT, id="first-start-waits"),
        pytest.param(None, SUN, WAIT, id="first-start-on-a-slot-waits"),
        pytest.param(SUN - WEEK, SUN, Plan(True, SUN, 0, SUN + WEEK), id="due-on-time"),
        pytest.param(
            SUN - WEEK, SUN + timedelta(seconds=90), Plan(True, SUN, 0, SUN + WEEK), id="in-grace"
        ),
        pytest.param(SUN - WEEK, SUN + DAY, Plan(True, SUN, 1, SUN + WEEK), id="one-missed"),
        pytest.param(SUN - 3 * WEEK, SUN + DAY, Plan(True, SUN, 3, SUN + WEEK), id="three-missed"),
        pytest.param(SUN - 3 * WEEK, SUN, Plan(True, SUN, 2, SUN + WEEK), id="2-missed-1-on-time"),
        pytest.param(SUN, SUN, WAIT, id="same-slot-not-doubled"),
        pytest.param(SUN, SUN + timedelta(seconds=59), WAIT, id="same-slot-minute-not-doubled"),
        pytest.param(SUN, SUN + 3 * DAY, WAIT, id="nothing-due"),
        pytest.param(SUN, SUN - 2 * DAY, WAIT, id="clock-went-back"),
        pytest.param(SUN + WEEK, SUN + DAY, Plan(False, None, 0, SUN + 2 * WEEK), id="far-back"),
    ],
)
def test_plan_runs_at_most_once_for_the_latest_due_slot(last_slot, now, expected):
    assert plan(WEEKLY, last_slot, now) == expected


def test_plan_caps_the_missed_count_and_still_runs_once():
    every_minute = CronSchedule.parse("* * * * *")
    started = time.monotonic()
    result = plan(every_minute, utc(2024, 1, 1), utc(2025, 1, 1, 0, 0, 10))
    assert result == Plan(True, utc(2025, 1, 1), MISSED_COUNT_LIMIT, utc(2025, 1, 1, 0, 1))
    assert time.monotonic() - started < 2


# --- the loop, on a fake clock ----------------------------------------------------------------


class EndOfSimulation(Exception):
    pass


class FakeClock:
    """`clock` and `sleep` for run_scheduler: sleeping advances time; past `end` it stops."""

    def __init__(self, now: datetime, end: datetime | None = None) -> None:
        self.now, self.end, self.sleeps = now, end, []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)
        if self.end is not None and self.now >= self.end:
            raise EndOfSimulation


def run(clock: FakeClock, job, state_dir: Path, logs: list[str], **kwargs) -> int:
    kwargs.setdefault("max_sleep_s", 3600.0)  # the simulations span weeks; keep them fast
    kwargs.setdefault("sleep", clock.sleep)
    return run_scheduler(WEEKLY, job, state_dir, clock=clock, log=logs.append, **kwargs)


def test_loop_runs_each_weekly_slot_exactly_once_on_time(tmp_path):
    clock = FakeClock(utc(2025, 1, 1, 10, 0), end=utc(2025, 1, 29))  # Wednesday, four weeks
    started: list[tuple[datetime, datetime]] = []

    def job(slot: datetime) -> None:
        started.append((slot, clock.now))
        clock.now += timedelta(minutes=40)  # the job takes a while

    logs: list[str] = []
    with pytest.raises(EndOfSimulation):
        run(clock, job, tmp_path, logs)
    sundays = [utc(2025, 1, d, 2, 0) for d in (5, 12, 19, 26)]
    assert started == [(s, s) for s in sundays]
    assert not any("missed" in line for line in logs)
    assert "first start" in logs[0]
    assert max(clock.sleeps) <= 3600
    state = load_state(state_file(tmp_path))
    assert state is not None
    assert (state.slot, state.outcome) == (sundays[-1], SlotOutcome.SUCCEEDED)
    assert state.ended_at - state.started_at == timedelta(minutes=40)


def test_loop_sleeps_in_chunks_of_at_most_a_minute_by_default(tmp_path):
    hourly = CronSchedule.parse("0 * * * *")
    clock = FakeClock(utc(2025, 1, 1, 10, 30), end=utc(2025, 1, 1, 13, 30))
    ran: list[datetime] = []
    with pytest.raises(EndOfSimulation):
        run_scheduler(hourly, ran.append, tmp_path, clock=clock, sleep=clock.sleep, log=print)
    assert ran == [utc(2025, 1, 1, h) for h in (11, 12, 13)]
    assert max(clock.sleeps) <= 60


def test_loop_returns_after_max_runs(tmp_path):
    clock = FakeClock(utc(2025, 1, 1, 10, 0))
    ran: list[datetime] = []
    assert run(clock, ran.append, tmp_path, [], max_runs=2) == 2
    assert ran == [SUN, SUN + WEEK]


def test_a_clock_jump_over_slots_mid_sleep_runs_once_and_a_jump_back_does_not_rerun(tmp_path):
    clock = FakeClock(utc(2025, 1, 1, 10, 0))
    ran: list[datetime] = []
    jumps = {1: SUN + 2 * WEEK + DAY, 2: SUN + 2 * WEEK - DAY}  # after the n-th run: jump here

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        clock.now = jumps.pop(len(ran), clock.now)  # a suspended VM wakes up; NTP steps back

    logs: list[str] = []
    run(clock, ran.append, tmp_path, logs, sleep=sleep, max_runs=3)
    assert ran == [SUN, SUN + 2 * WEEK, SUN + 3 * WEEK]
    assert "missed 2 run(s); running once now for slot 2025-01-19 02:00 UTC" in logs


def test_a_failing_job_is_recorded_as_failed_and_the_next_slot_still_runs(tmp_path):
    clock = FakeClock(utc(2025, 1, 1, 10, 0))
    ran: list[datetime] = []

    def job(slot: datetime) -> None:
        ran.append(slot)
        if slot == SUN:
            raise RuntimeError("teacher unreachable")

    logs: list[str] = []
    run(clock, job, tmp_path, logs, max_runs=1)
    state = load_state(state_file(tmp_path))
    assert state is not None
    assert (state.slot, state.outcome) == (SUN, SlotOutcome.FAILED)
    assert state.error == "RuntimeError: teacher unreachable"
    assert any("failed: RuntimeError: teacher unreachable" in line for line in logs)
    assert run(clock, job, tmp_path, logs, max_runs=1) == 1  # not retried; next slot runs
    assert ran == [SUN, SUN + WEEK]


def test_the_slot_is_recorded_as_running_before_the_job_starts(tmp_path):
    clock = FakeClock(utc(2025, 1, 1, 10, 0))
    seen: list[ScheduleState | None] = []

    def job(slot: datetime) -> None:
        seen.append(load_state(state_file(tmp_path)))

    run(clock, job, tmp_path, [], max_runs=1)
    assert seen[0] is not None
    assert (seen[0].slot, seen[0].outcome, seen[0].pid) == (SUN, SlotOutcome.RUNNING, os.getpid())


def test_ctrl_c_mid_job_is_recorded_as_interrupted_and_releases_the_lock(tmp_path):
    clock = FakeClock(utc(2025, 1, 1, 10, 0))

    def job(slot: datetime) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(clock, job, tmp_path, [], max_runs=1)
    state = load_state(state_file(tmp_path))
    assert state is not None
    assert (state.slot, state.outcome) == (SUN, SlotOutcome.INTERRUPTED)
    ran: list[datetime] = []
    run(clock, ran.append, tmp_path, [], max_runs=1)  # the lock is free again
    assert ran == [SUN + WEEK]


CRASHING_SCHEDULER = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from stillhouse.rollout.schedule import CronSchedule, run_scheduler

    def job(slot):
        print("in job", flush=True)
        time.sleep(60)

    now = datetime(2025, 1, 5, 2, 0, 5, tzinfo=UTC)
    run_scheduler(CronSchedule.parse("0 2 * * 0"), job, Path(sys.argv[1]),
                  clock=lambda: now, sleep=time.sleep, log=lambda m: None)
    """
)


def test_a_restart_after_the_scheduler_died_mid_job_does_not_rerun_that_slot(tmp_path):
    state_path = state_file(tmp_path)
    write_state(state_path, ScheduleState("0 2 * * 0", SUN - WEEK, SlotOutcome.SUCCEEDED))
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SCHEDULER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in job"
    finally:
        child.send_signal(signal.SIGKILL)  # no chance to record anything
        child.wait(timeout=10)
    state = load_state(state_path)
    assert state is not None
    assert (state.slot, state.outcome, state.pid) == (SUN, SlotOutcome.RUNNING, child.pid)

    clock = FakeClock(SUN + timedelta(hours=1))
    ran: list[datetime] = []
    logs: list[str] = []
    run(clock, ran.append, tmp_path, logs, max_runs=1)  # the dead child's lock is gone
    assert ran == [SUN + WEEK]
    assert any("2025-01-05 02:00 UTC" in line and "not re-running" in line for line in logs)


# --- state file and lock ----------------------------------------------------------------------


def test_state_round_trips_through_an_atomic_write(tmp_path):
    path = tmp_path / "schedule" / "state.json"
    state = ScheduleState("0 2 * * 0", SUN, SlotOutcome.FAILED, SUN, SUN + WEEK, "X: y", 42)
    write_state(path, state)
    assert load_state(path) == state
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp file left


def test_no_state_is_a_first_start_and_a_corrupt_state_refuses_to_guess(tmp_path):
    path = state_file(tmp_path)
    assert load_state(path) is None
    path.parent.mkdir(parents=True)
    path.write_text('{"slot": "yesterday"')
    with pytest.raises(ScheduleStateError, match=r"state\.json is unreadable"):
        load_state(path)
    ran: list[datetime] = []
    with pytest.raises(ScheduleStateError):
        run(FakeClock(SUN + WEEK), ran.append, tmp_path, [], max_runs=1)
    assert ran == []


LOCK_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from stillhouse.rollout.schedule import schedule_lock

    with schedule_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    sys.stdin.readline()
    """
)


def test_a_second_scheduler_is_refused_while_another_process_holds_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ScheduleLockedError) as err, schedule_lock(tmp_path):
            pass
        message = str(err.value)
        assert str(schedule_dir(tmp_path) / "lock") in message
        assert f"pid {holder.pid}" in message and "\n" not in message
        assert isinstance(err.value, StillhouseError)
        ran: list[datetime] = []
        with pytest.raises(ScheduleLockedError):
            run(FakeClock(SUN), ran.append, tmp_path, [], max_runs=1)
        assert ran == []

        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        with schedule_lock(tmp_path) as lock_path:  # admitted once the holder lets go
            assert lock_path.read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(timeout=10)
