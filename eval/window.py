"""Time windows over the traffic log: `--since 2h`, `--since 2026-11-24T09:00`, or the whole log.

    parse_since("90m", now)  -> now - 5400 s
    parse_since("2026-11-24T09:00:00+00:00", now) -> that instant

A window is [since, until) in unix seconds; its label is what tables, plots and MLflow params
show so a reader knows which traffic a number describes. `read_window` reads its records.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stillhouse.common.errors import UsageError
from stillhouse.common.traffic import TrafficLogReader, TrafficRecord

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Window:
    since: float | None
    until: float | None

    @property
    def label(self) -> str:
        def fmt(t: float | None, empty: str) -> str:
            if t is None:
                return empty
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

        return f"{fmt(self.since, 'start of log')} to {fmt(self.until, 'now')}"


def parse_since(text: str, now: float) -> float:
    """A duration back from `now` (30s, 90m, 2h, 7d, 1w) or an ISO 8601 time (UTC if naive)."""
    m = _DURATION.match(text)
    if m:
        return now - float(m[1]) * _SECONDS[m[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration such as 30m, 2h, 7d or an ISO time "
            "such as 2026-11-24T09:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def make_window(since: str | None, window_hours: float | None, now: float | None = None) -> Window:
    """`--since` when given, else the configured default window (None: the whole log)."""
    now = time.time() if now is None else now
    if since is not None:
        start = parse_since(since, now)
        if start > now:
            raise UsageError(f"--since {since!r} is in the future")
        return Window(start, None)
    if window_hours is None:
        return Window(None, None)
    return Window(now - window_hours * 3600, None)


def read_window(traffic_log_path: Path, window: Window) -> list[TrafficRecord]:
    """The traffic records of `window`; a missing log is the user's cue to serve traffic first."""
    if not traffic_log_path.is_file():
        raise UsageError(
            f"no traffic log at {traffic_log_path}: serve traffic first "
            "(`stillhouse serve`, or `make demo`)"
        )
    with TrafficLogReader(traffic_log_path) as log:
        return log.records(since=window.since, until=window.until)
