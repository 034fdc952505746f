"""The scheduling core of `stillhouse schedule`: a 5-field cron parser, a pure run-or-wait
decision (`plan`), and a loop (`run_scheduler`) that runs one re-distillation per cron slot, at
most once per slot, with one scheduler per state dir.

    stillhouse schedule     # run_scheduler(CronSchedule.parse(settings.schedule.cron), job, dir)

`run_scheduler`'s docstring states the semantics (missed slots, crashes, the state file).
"""

from __future__ import annotations

import bisect
import calendar
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from stillhouse.common.errors import StillhouseError
from stillhouse.common.instance_lock import instance_lock

# The Gregorian calendar repeats every 400 years, so a date/weekday combination that can occur
# at all occurs within that window: a search that finds nothing in it never will.
SEARCH_YEARS = 400
# A slot fired within this long of `now` counts as on time, not missed.
LATE_GRACE = timedelta(minutes=5)
# Counting missed slots stops here (a per-minute schedule down for a year has 525,600).
MISSED_COUNT_LIMIT = 10_000
MAX_SLEEP_S = 60.0

_MONTHS = {n.lower(): i for i, n in enumerate(calendar.month_abbr) if n}
_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# (name, lowest, highest, names) per field, in cron order.
_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _WEEKDAYS),
)
_MAX_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # index = month; Feb in leap years


class CronError(StillhouseError, ValueError):
    """A cron expression is invalid or can never fire. The message is one line naming the field."""

    exit_code = 2


class ScheduleLockedError(StillhouseError):
    """Another scheduler holds the lock on this state dir."""


class ScheduleStateError(StillhouseError):
    """The schedule state file cannot be read; the message says how to recover."""


class _FieldError(Exception):
    pass


def _utc(t: datetime) -> datetime:
    """`t` in UTC; naive datetimes are refused since their zone would be a guess."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"naive datetime {t.isoformat()}: schedule times must be timezone-aware")
    return t.astimezone(UTC)


def _value(text: str, lo: int, hi: int, names: dict[str, int]) -> int:
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdecimal():
        raise _FieldError(f"{text!r} is not a number" + (" or a name" if names else ""))
    if not lo <= int(text) <= hi:
        raise _FieldError(f"{text} is out of range {lo}-{hi}")
    return int(text)


def _parse_field(text: str, lo: int, hi: int, names: dict[str, int]) -> tuple[int, ...]:
    values: set[int] = set()
    for item in text.split(","):
        base, has_step, step_text = item.partition("/")
        step = 1
        if has_step:
            if not step_text.isdecimal() or int(step_text) == 0:
                raise _FieldError(f"step {step_text!r} is not a positive number")
            step = int(step_text)
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            a, b = base.split("-", 1)
            first, last = _value(a, lo, hi, names), _value(b, lo, hi, names)
            if hi == 7 and last == 0 < first:  # "sat-sun": Sunday ends a weekday range as 7
                last = 7
            if first > last:
                raise _FieldError(f"range {base!r} runs backwards")
        else:  # "a/n" means "a-<highest>/n", as in Vixie cron
            first = _value(base, lo, hi, names)
            last = hi if has_step else first
        values.update(range(first, last + 1, step))
    return tuple(sorted(values))


@dataclass(frozen=True)
class CronSchedule:
    """A parsed 5-field cron expression, evaluated in UTC at minute resolution.

    `dom_star`/`dow_star` record whether day-of-month/day-of-week began with `*`: as in Vixie
    cron, when neither does a day matches if *either* field matches, otherwise both must.
    """

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 = Sunday ... 6 = Saturday
    dom_star: bool
    dow_star: bool

    @classmethod
    def parse(cls, expr: str) -> CronSchedule:
        """Parse `expr`; raise CronError naming the bad field, or saying why it never fires."""
        fields = expr.split()
        if len(fields) != 5:
            raise CronError(
                f"invalid cron expression {expr!r}: expected 5 fields "
                f"(minute hour day-of-month month day-of-week), got {len(fields)}"
            )
        parsed = []
        for (name, lo, hi, names), field in zip(_FIELDS, fields, strict=True):
            try:
                parsed.append(_parse_field(field, lo, hi, names))
            except _FieldError as exc:
                raise CronError(
                    f"invalid cron expression {expr!r}: {name} field {field!r}: {exc}"
                ) from None
        weekdays = tuple(sorted({d % 7 for d in parsed[4]}))  # 7 is Sunday too
        dom_star, dow_star = fields[2].startswith("*"), fields[4].startswith("*")
        schedule = cls(" ".join(fields), *parsed[:4], weekdays, dom_star, dow_star)
        # Only a day-of-month that no listed month has can make a parsed expression impossible:
        # every month holds every weekday, and every real date falls on every weekday in turn.
        days, months = parsed[2], parsed[3]
        if (dom_star or dow_star) and not any(d <= _MAX_DAYS[m] for m in months for d in days):
            raise CronError(
                f"cron expression {expr!r} never fires: day-of-month {fields[2]!r} "
                f"does not occur in month {fields[3]!r}"
            )
        return schedule

    def _day_matches(self, t: datetime) -> bool:
        dom_ok = t.day in self.days
        dow_ok = t.isoweekday() % 7 in self.weekdays
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def next_after(self, t: datetime) -> datetime:
        """The first fire time strictly after `t` (UTC). Skips whole months, days and hours."""
        start = _utc(t).replace(tzinfo=None, second=0, microsecond=0)
        try:
            cur = start + timedelta(minutes=1)
            while cur.year <= start.year + SEARCH_YEARS:
                if cur.month not in self.months:
                    i = bisect.bisect_right(self.months, cur.month)
                    year = cur.year if i < len(self.months) else cur.year + 1
                    cur = datetime(year, self.months[i % len(self.months)], 1)
                elif not self._day_matches(cur):
                    cur = datetime(cur.year, cur.month, cur.day) + timedelta(days=1)
                elif cur.hour not in self.hours:
                    i = bisect.bisect_right(self.hours, cur.hour)
                    day = datetime(cur.year, cur.month, cur.day)
                    cur = day + timedelta(hours=self.hours[i] if i < len(self.hours) else 24)
                else:
                    i = bisect.bisect_left(self.minutes, cur.minute)
                    if i < len(self.minutes):
                        return cur.replace(minute=self.minutes[i], tzinfo=UTC)
                    cur = cur.replace(minute=0) + timedelta(hours=1)
        except (OverflowError, ValueError):  # ran past datetime.max
            pass
        raise CronError(f"cron expression {self.expr!r} never fires after {start:%Y-%m-%d %H:%M}")

    def previous_at_or_before(self, t: datetime) -> datetime:
        """The latest fire time at or before `t` (UTC): the slot a late scheduler still owes."""
        end = _utc(t).replace(tzinfo=None, second=0, microsecond=0)
        cur = end
        minute = timedelta(minutes=1)
        try:
            while cur.year >= end.year - SEARCH_YEARS:
                if cur.month not in self.months:
                    i = bisect.bisect_left(self.months, cur.month)
                    year = cur.year if i > 0 else cur.year - 1
                    month = self.months[i - 1]
                    cur = datetime(year, month, calendar.monthrange(year, month)[1], 23, 59)
                elif not self._day_matches(cur):
                    cur = datetime(cur.year, cur.month, cur.day) - minute
                elif cur.hour not in self.hours:
                    i = bisect.bisect_left(self.hours, cur.hour)
                    day = datetime(cur.year, cur.month, cur.day)
                    cur = day.replace(hour=self.hours[i - 1], minute=59) if i > 0 else day - minute
                else:
                    i = bisect.bisect_right(self.minutes, cur.minute)
                    if i > 0:
                        return cur.replace(minute=self.minutes[i - 1], tzinfo=UTC)
                    cur = cur.replace(minute=0) - minute
        except (OverflowError, ValueError):  # ran past datetime.min
            pass
        raise CronError(f"cron expression {self.expr!r} never fired before {end:%Y-%m-%d %H:%M}")


@dataclass(frozen=True)
class Plan:
    """What the scheduler should do now: run `slot` at once, or sleep until `next_at`.

    `missed` counts slots that were not run on time (capped at MISSED_COUNT_LIMIT); they are all
    covered by the single run of `slot`, the latest of them.
    """

    run_now: bool
    slot: datetime | None
    missed: int
    next_at: datetime


def plan(
    schedule: CronSchedule,
    last_slot: datetime | None,
    now: datetime,
    *,
    grace: timedelta = LATE_GRACE,
) -> Plan:
    """Decide, without I/O, whether a slot is due given the last slot handled (None: first start).

    Slots in (last_slot, now] are due; however many there are, one run covers them, for the
    latest. The latest counts as missed too unless it fired within `grace` of `now`. A last_slot
    after `now` (the clock went back) makes nothing due until the first slot after it.
    """
    now = _utc(now)
    if last_slot is None:
        return Plan(run_now=False, slot=None, missed=0, next_at=schedule.next_after(now))
    last_slot = _utc(last_slot)
    latest = schedule.previous_at_or_before(now)
    if latest <= last_slot:
        return Plan(False, None, 0, schedule.next_after(max(now, last_slot)))
    due, t = 0, last_slot
    while due < MISSED_COUNT_LIMIT + 1 and (t := schedule.next_after(t)) <= now:
        due += 1
    missed = due - 1 if now - latest <= grace else due
    return Plan(True, latest, min(missed, MISSED_COUNT_LIMIT), schedule.next_after(now))


class SlotOutcome(StrEnum):
    """What became of the last slot the scheduler handled (recorded in its state file)."""

    BASELINE = "baseline"  # first start: the latest past slot, recorded so it is never run
    RUNNING = "running"  # written before the job starts; still there after a crash
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the job raised
    INTERRUPTED = "interrupted"  # Ctrl-C mid-job, or found "running" by the next scheduler


@dataclass(frozen=True)
class ScheduleState:
    """The state file: the last slot handled (run or, on first start, skipped) and its outcome."""

    cron: str
    slot: datetime
    outcome: SlotOutcome
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None
    pid: int | None = None

    def to_json(self) -> str:
        data = {"version": 1, **asdict(self)}
        return json.dumps(data, indent=2, default=datetime.isoformat) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ScheduleState:
        data = json.loads(text)
        data.pop("version", None)
        for key in ("slot", "started_at", "ended_at"):
            if key == "slot" or data.get(key) is not None:
                data[key] = _utc(datetime.fromisoformat(data[key]))
        return cls(**{**data, "outcome": SlotOutcome(data["outcome"])})


def schedule_dir(state_dir: Path) -> Path:
    """Where the scheduler keeps `state.json` and `lock`."""
    return Path(state_dir) / "schedule"


def state_file(state_dir: Path) -> Path:
    return schedule_dir(state_dir) / "state.json"


def load_state(path: Path) -> ScheduleState | None:
    """The recorded state, or None if there is none yet (first start)."""
    try:
        return ScheduleState.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ScheduleStateError(
            f"schedule state {path} is unreadable ({type(exc).__name__}: {exc}); fix it, or "
            "delete it to start afresh (no retroactive run)"
        ) from None


def write_state(path: Path, state: ScheduleState) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old or the new state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def schedule_lock(state_dir: Path) -> Iterator[Path]:
    """Hold an exclusive flock on `<state_dir>/schedule/lock` (which records our pid) or raise
    ScheduleLockedError at once. The kernel drops the lock when the process dies, and the
    descriptor is not inherited (Python's default), so a job's stray subprocess cannot keep it.
    """
    path = schedule_dir(state_dir) / "lock"
    with instance_lock(
        path,
        lambda who: ScheduleLockedError(
            f"another `stillhouse schedule` ({who}) holds {path}; one per state dir"
        ),
    ):
        yield path


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M} UTC"


def run_scheduler(
    schedule: CronSchedule,
    job: Callable[[datetime], None],
    state_dir: Path,
    *,
    clock: Callable[[], datetime] = _utc_now,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = _stderr,
    max_runs: int | None = None,
    max_sleep_s: float = MAX_SLEEP_S,
    grace: timedelta = LATE_GRACE,
) -> int:
    """Run `job(slot)` once per due slot until `max_runs` runs (None: forever); return the count.

    At most once per slot, never doubled: before the job starts, its slot is written (atomically,
    fsynced) to `<state_dir>/schedule/state.json` as "running", and its outcome replaces that
    when the job ends. A slot recorded there is never run again, whatever its outcome, so after a
    crash mid-job (the file still says "running") the restarted scheduler logs that slot as
    interrupted and does not re-run it: the job may have registered a model before dying, and a
    second run could double it; re-run by hand if needed. Slots that passed while no scheduler
    was up (or while a long job ran) are collapsed into one run, for the latest, started at once
    and logged as "missed N run(s)". A first start (no state file) runs nothing retroactively: it
    records the latest past slot as a baseline and waits. A job raising an Exception is logged,
    recorded as failed and not retried; the loop waits for the next slot. KeyboardInterrupt and
    SystemExit are recorded as interrupted and propagate. The lock (`schedule_lock`) is held
    throughout, so a second scheduler on the same state dir gets ScheduleLockedError at once.
    Waits in chunks of at most `max_sleep_s`, re-planning after each, so clock jumps are noticed.
    """
    with schedule_lock(state_dir):
        path = state_file(state_dir)
        state = load_state(path)
        if state is None:
            baseline = schedule.previous_at_or_before(clock())
            state = ScheduleState(schedule.expr, baseline, SlotOutcome.BASELINE)
            write_state(path, state)
            log(f"first start ({path} created): earlier slots are not run retroactively")
        elif state.outcome is SlotOutcome.RUNNING:
            started = _fmt(state.started_at) if state.started_at else "?"
            log(
                f"the run for slot {_fmt(state.slot)} (started {started}, pid {state.pid}) "
                "never finished: the scheduler died mid-job; not re-running it"
            )
            state = replace(state, outcome=SlotOutcome.INTERRUPTED)
            write_state(path, state)
        if state.cron != schedule.expr:
            log(f"schedule changed from {state.cron!r} to {schedule.expr!r}")
        runs, announced = 0, None
        while max_runs is None or runs < max_runs:
            now = clock()
            p = plan(schedule, state.slot, now, grace=grace)
            if not p.run_now:
                if p.next_at != announced:
                    log(f"next run at {_fmt(p.next_at)} ({schedule.expr})")
                    announced = p.next_at
                sleep(min((p.next_at - now).total_seconds(), max_sleep_s))
                continue
            assert p.slot is not None
            if p.missed:
                more = "+" if p.missed >= MISSED_COUNT_LIMIT else ""
                log(f"missed {p.missed}{more} run(s); running once now for slot {_fmt(p.slot)}")
            else:
                log(f"running slot {_fmt(p.slot)}")
            state = _run_once(schedule, job, p.slot, path, clock, log)
            runs += 1
        return runs


def _run_once(
    schedule: CronSchedule,
    job: Callable[[datetime], None],
    slot: datetime,
    path: Path,
    clock: Callable[[], datetime],
    log: Callable[[str], None],
) -> ScheduleState:
    started = clock()
    state = ScheduleState(schedule.expr, slot, SlotOutcome.RUNNING, started, pid=os.getpid())
    write_state(path, state)  # claim the slot first: a crash from here on never re-runs it
    try:
        job(slot)
    except Exception as exc:
        state = replace(state, outcome=SlotOutcome.FAILED, ended_at=clock(), error=_describe(exc))
        write_state(path, state)
        log(f"run for slot {_fmt(slot)} failed: {state.error}")
        if not isinstance(exc, StillhouseError):
            log(traceback.format_exc().rstrip())
        return state
    except BaseException as exc:
        error = _describe(exc)
        end = replace(state, outcome=SlotOutcome.INTERRUPTED, ended_at=clock(), error=error)
        write_state(path, end)
        log(f"run for slot {_fmt(slot)} interrupted ({end.error}); it will not be re-run")
        raise
    ended = clock()
    state = replace(state, outcome=SlotOutcome.SUCCEEDED, ended_at=ended)
    write_state(path, state)
    log(f"run for slot {_fmt(slot)} succeeded in {ended - started}")
    return state


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
