"""Every re-distillation run leaves its outcome as Prometheus gauges in
`<state_dir>/metrics/redistill.prom` (served by `stillhouse controller`'s /metrics), so the
dashboard shows the last success, the duration and the failures, and an alert fires when a run
failed or the weekly slot passed without a success:

    stillhouse_redistill_last_success_timestamp_seconds 1.7640e+09
    stillhouse_redistill_runs_total{outcome="failure"} 1.0

A batch job cannot be scraped while it runs, so it writes a text file atomically (the node
exporter's textfile convention). The run counts carry over from the previous file: counters must
not drop when the next run writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

OUTCOMES = ("success", "failure")


@dataclass(frozen=True)
class RedistillHistory:
    """What the file must remember across runs."""

    successes: float = 0.0
    failures: float = 0.0
    last_success_at: float | None = None
    last_failure_at: float | None = None


def read_history(path: Path) -> RedistillHistory:
    """The previous file's totals and timestamps; an absent or unreadable file is a fresh start
    (logged), never a reason to fail the run that is recording itself."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return RedistillHistory()
    except OSError as e:
        log.warning("cannot read %s (%s); run counts start again", path, e)
        return RedistillHistory()
    values: dict[tuple[str, str], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, sample.labels.get("outcome", ""))] = sample.value
    except ValueError as e:
        log.warning("cannot parse %s (%s); run counts start again", path, e)
        return RedistillHistory()
    return RedistillHistory(
        successes=values.get(("stillhouse_redistill_runs_total", "success"), 0.0),
        failures=values.get(("stillhouse_redistill_runs_total", "failure"), 0.0),
        last_success_at=values.get(("stillhouse_redistill_last_success_timestamp_seconds", "")),
        last_failure_at=values.get(("stillhouse_redistill_last_failure_timestamp_seconds", "")),
    )


def write_redistill_metrics(
    path: Path, started_at: float, ended_at: float, success: bool
) -> RedistillHistory:
    """Add one run to `path` (atomic rewrite); returns the history now recorded."""
    before = read_history(path)
    after = RedistillHistory(
        successes=before.successes + success,
        failures=before.failures + (not success),
        last_success_at=ended_at if success else before.last_success_at,
        last_failure_at=before.last_failure_at if success else ended_at,
    )
    r = CollectorRegistry()
    runs = Counter(
        "stillhouse_redistill_runs",
        "Re-distillation runs, by outcome (success: a student registered, or already was).",
        ["outcome"],
        registry=r,
    )
    runs.labels("success").inc(after.successes)
    runs.labels("failure").inc(after.failures)

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            Gauge(name, doc, registry=r).set(value)

    gauge("stillhouse_redistill_last_run_timestamp_seconds", "When the last run ended.", ended_at)
    gauge(
        "stillhouse_redistill_last_run_duration_seconds",
        "How long the last run took.",
        max(0.0, ended_at - started_at),
    )
    gauge(
        "stillhouse_redistill_last_run_success",
        "1 when the last run succeeded, else 0.",
        float(success),
    )
    gauge(
        "stillhouse_redistill_last_success_timestamp_seconds",
        "When the last successful run ended.",
        after.last_success_at,
    )
    gauge(
        "stillhouse_redistill_last_failure_timestamp_seconds",
        "When the last failed run ended.",
        after.last_failure_at,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), r)
    return after


@contextlib.contextmanager
def recording_run(path: Path, clock: Callable[[], float] = time.time) -> Iterator[None]:
    """Record the block as one run: a success when it returns, a failure when it raises an
    Exception (re-raised). An interrupt (Ctrl-C) is not a run and leaves the file alone. A
    failure to write the metrics is logged; it never fails or masks the run itself."""
    started = clock()
    try:
        yield
    except Exception:
        _write_quietly(path, started, clock(), success=False)
        raise
    _write_quietly(path, started, clock(), success=True)


def _write_quietly(path: Path, started: float, ended: float, *, success: bool) -> None:
    try:
        write_redistill_metrics(path, started, ended, success)
    except OSError as e:
        log.warning("cannot write re-distillation metrics to %s: %s", path, e)
