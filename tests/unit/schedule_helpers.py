"""Shared by the schedule tests: the default weekly cron and a UTC date helper."""

from datetime import UTC, datetime, timedelta

from stillhouse.rollout.schedule import CronSchedule

WEEKLY = CronSchedule.parse("0 2 * * 0")  # the default: Sundays 02:00 UTC
WEEK = timedelta(weeks=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


SUN = utc(2025, 1, 5, 2, 0)  # a Sunday 02:00 slot
