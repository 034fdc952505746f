"""Cron expressions for `stillhouse schedule`: parsing, and the next and previous fire times."""

import dataclasses
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from schedule_helpers import WEEKLY, utc

from stillhouse.common.errors import StillhouseError
from stillhouse.rollout.schedule import (
    CronError,
    CronSchedule,
    plan,
)

# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "field", "expected"),
    [
        ("0 2 * * 0", "minutes", (0,)),
        ("1,5,7 * * * *", "minutes", (1, 5, 7)),
        ("*/15 * * * *", "minutes", (0, 15, 30, 45)),
        ("10-20/5 * * * *", "minutes", (10, 15, 20)),
        ("5/20 * * * *", "minutes", (5, 25, 45)),
        ("0 9-11,14 * * *", "hours", (9, 10, 11, 14)),
        ("0 0 1-31/10 * *", "days", (1, 11, 21, 31)),
        ("0 0 * jan,JUL *", "months", (1, 7)),
        ("0 0 * Mar-May *", "months", (3, 4, 5)),
        ("0 0 * * mon-fri", "weekdays", (1, 2, 3, 4, 5)),
        ("0 0 * * SUN", "weekdays", (0,)),
        ("0 0 * * 7", "weekdays", (0,)),
        ("0 0 * * 0,7", "weekdays", (0,)),
        ("0 0 * * 5-7", "weekdays", (0, 5, 6)),
        ("0 0 * * sat-sun", "weekdays", (0, 6)),
        ("0 0 * * mon-sun", "weekdays", (0, 1, 2, 3, 4, 5, 6)),
        ("0 0 * * sun-sun", "weekdays", (0,)),
        ("0 0 * * */2", "weekdays", (0, 2, 4, 6)),
    ],
)
def test_parse_expands_numbers_ranges_lists_steps_and_names(expr, field, expected):
    assert getattr(CronSchedule.parse(expr), field) == expected


def test_parse_normalises_whitespace_and_keeps_the_expression():
    assert CronSchedule.parse("  0  2 * *\t0 ") == WEEKLY
    assert WEEKLY.expr == "0 2 * * 0"


@pytest.mark.parametrize(
    ("expr", "day", "fires"),
    [
        # Both restricted: a day matches if EITHER field does (Vixie cron).
        ("0 0 13 * 5", utc(2024, 9, 13), True),  # Friday the 13th
        ("0 0 13 * 5", utc(2024, 9, 6), True),  # a Friday
        ("0 0 13 * 5", utc(2024, 3, 13), True),  # a 13th (Wednesday)
        ("0 0 13 * 5", utc(2024, 3, 14), False),  # neither
        # Only one restricted: that one decides.
        ("0 0 13 * *", utc(2024, 3, 13), True),
        ("0 0 13 * *", utc(2024, 3, 15), False),
        ("0 0 * * 5", utc(2024, 3, 15), True),
        ("0 0 * * 5", utc(2024, 3, 13), False),
        # A field led by '*' (like */2) counts as unrestricted, so both must match.
        ("0 0 */2 * 1", utc(2024, 3, 11), True),  # odd day, Monday
        ("0 0 */2 * 1", utc(2024, 3, 18), False),  # even day, Monday
        ("0 0 */2 * 1", utc(2024, 3, 13), False),  # odd day, Wednesday
    ],
)
def test_day_of_month_and_day_of_week_combine_like_vixie_cron(expr, day, fires):
    assert (CronSchedule.parse(expr).next_after(day - timedelta(minutes=1)) == day) is fires


@pytest.mark.parametrize(
    ("expr", "named"),
    [
        ("0 2 * *", "expected 5 fields"),
        ("* * * * * *", "got 6"),
        ("", "got 0"),
        ("60 * * * *", "minute field '60': 60 is out of range 0-59"),
        ("-1 * * * *", "minute field '-1'"),
        ("jan * * * *", "minute field 'jan'"),
        ("*/0 * * * *", "minute field '*/0'"),
        ("5-1 * * * *", "minute field '5-1': range '5-1' runs backwards"),
        ("1,,2 * * * *", "minute field '1,,2'"),
        ("* 24 * * *", "hour field '24'"),
        ("* * 0 * *", "day-of-month field '0'"),
        ("* * 32 * *", "day-of-month field '32'"),
        ("* * * 13 *", "month field '13'"),
        ("* * * foo *", "month field 'foo'"),
        ("* * * * 8", "day-of-week field '8'"),
        ("* * * * fry", "day-of-week field 'fry'"),
        ("0 0 31 2 *", "never fires: day-of-month '31' does not occur in month '2'"),
        ("0 0 31 apr,jun,sep,nov *", "never fires"),
    ],
)
def test_invalid_expressions_raise_one_line_naming_the_field(expr, named):
    with pytest.raises(CronError) as err:
        CronSchedule.parse(expr)
    assert isinstance(err.value, ValueError) and isinstance(err.value, StillhouseError)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


# --- next_after / previous_at_or_before -------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("0 2 * * 0", utc(2024, 12, 29, 1, 59, 59), utc(2024, 12, 29, 2, 0)),
        ("0 2 * * 0", utc(2024, 12, 29, 2, 0), utc(2025, 1, 5, 2, 0)),  # strictly after
        ("0 2 * * 0", utc(2024, 12, 29, 2, 0, 30), utc(2025, 1, 5, 2, 0)),
        ("* * * * *", utc(2024, 1, 1, 0, 0, 30), utc(2024, 1, 1, 0, 1)),
        ("*/15 * * * *", utc(2024, 2, 29, 23, 50), utc(2024, 3, 1, 0, 0)),
        ("0 0 1 * *", utc(2024, 1, 31, 23, 59), utc(2024, 2, 1)),
        ("59 23 31 12 *", utc(2024, 12, 31, 23, 59), utc(2025, 12, 31, 23, 59)),
        ("0 0 31 * *", utc(2024, 4, 1), utc(2024, 5, 31)),
        ("0 0 29 2 *", utc(2023, 1, 1), utc(2024, 2, 29)),
        ("0 0 29 2 *", utc(2024, 3, 1), utc(2028, 2, 29)),
        ("0 0 29 2 *", utc(2096, 3, 1), utc(2104, 2, 29)),  # 2100 is not a leap year
        ("0 12 * feb mon", utc(2023, 12, 31), utc(2024, 2, 5, 12, 0)),
    ],
)
def test_next_after_is_the_first_fire_time_strictly_after(expr, after, expected):
    assert CronSchedule.parse(expr).next_after(after) == expected


@pytest.mark.parametrize(
    ("expr", "at", "expected"),
    [
        ("0 2 * * 0", utc(2025, 1, 5, 2, 0), utc(2025, 1, 5, 2, 0)),  # at counts
        ("0 2 * * 0", utc(2025, 1, 5, 2, 0, 59), utc(2025, 1, 5, 2, 0)),
        ("0 2 * * 0", utc(2025, 1, 5, 1, 59), utc(2024, 12, 29, 2, 0)),
        ("0 0 1 jan *", utc(2024, 12, 31, 23, 59), utc(2024, 1, 1)),
        ("0 0 29 2 *", utc(2027, 1, 1), utc(2024, 2, 29)),
        ("30 */6 * * *", utc(2024, 3, 1, 0, 10), utc(2024, 2, 29, 18, 30)),
    ],
)
def test_previous_at_or_before_is_the_latest_fire_time_not_after(expr, at, expected):
    assert CronSchedule.parse(expr).previous_at_or_before(at) == expected


@pytest.mark.parametrize("expr", ["*/7 9-17 * * mon-fri", "0 0 14 * 5", "15 3 */2 * fri"])
def test_next_and_previous_agree_with_a_minute_by_minute_scan(expr):
    schedule = CronSchedule.parse(expr)

    def fires(t: datetime) -> bool:
        dom, dow = t.day in schedule.days, t.isoweekday() % 7 in schedule.weekdays
        day = (dom and dow) if schedule.dom_star or schedule.dow_star else (dom or dow)
        return t.minute in schedule.minutes and t.hour in schedule.hours and day

    start = utc(2024, 9, 12)  # Thursday to Sunday, over a Friday the 13th
    window = [start + timedelta(minutes=m) for m in range(4 * 24 * 60)]
    fire_times = [t for t in window if fires(t)]
    assert fire_times
    for t in window[:: 7 if len(fire_times) > 50 else 1]:
        later = [f for f in fire_times if f > t]
        earlier = [f for f in fire_times if f <= t]
        if later:
            assert schedule.next_after(t) == later[0]
        if earlier:
            assert schedule.previous_at_or_before(t) == earlier[-1]


def test_an_impossible_schedule_raises_instead_of_searching_forever():
    # parse() refuses impossible expressions; build one around it to test the search bound.
    never = dataclasses.replace(CronSchedule.parse("0 0 28 2 *"), days=(30, 31))
    started = time.monotonic()
    with pytest.raises(CronError, match="never fires"):
        never.next_after(utc(2024, 1, 1))
    with pytest.raises(CronError, match="never fired"):
        never.previous_at_or_before(utc(2024, 1, 1))
    assert time.monotonic() - started < 2


def test_running_off_the_end_of_the_calendar_is_a_cron_error():
    with pytest.raises(CronError):
        WEEKLY.next_after(datetime.max.replace(tzinfo=UTC))
    with pytest.raises(CronError):
        WEEKLY.previous_at_or_before(datetime.min.replace(tzinfo=UTC))


def test_times_are_utc_and_naive_datetimes_are_refused():
    plus_two = timezone(timedelta(hours=2))
    nxt = WEEKLY.next_after(datetime(2024, 12, 29, 3, 30, tzinfo=plus_two))  # 01:30 UTC
    assert nxt == utc(2024, 12, 29, 2, 0) and nxt.tzinfo is UTC
    for call in (WEEKLY.next_after, WEEKLY.previous_at_or_before):
        with pytest.raises(ValueError, match="naive"):
            call(datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        plan(WEEKLY, None, datetime(2025, 1, 1))
