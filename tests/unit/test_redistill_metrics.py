"""Each re-distillation run leaves its outcome in redistill.prom; counts carry over."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stillhouse.rollout.distill.metrics import (
    RedistillHistory,
    read_history,
    recording_run,
    write_redistill_metrics,
)


def _values(path: Path) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("outcome", "")): s.value
        for f in text_string_to_metric_families(path.read_text())
        for s in f.samples
    }


def test_a_success_then_a_failure_keeps_the_last_success_and_counts_both(tmp_path: Path):
    path = tmp_path / "metrics" / "redistill.prom"
    write_redistill_metrics(path, 100.0, 160.0, success=True)
    after = write_redistill_metrics(path, 1000.0, 1030.0, success=False)
    assert after == RedistillHistory(1.0, 1.0, 160.0, 1030.0)
    v = _values(path)
    assert v[("stillhouse_redistill_runs_total", "success")] == 1.0
    assert v[("stillhouse_redistill_runs_total", "failure")] == 1.0
    assert v[("stillhouse_redistill_last_success_timestamp_seconds", "")] == 160.0
    assert v[("stillhouse_redistill_last_failure_timestamp_seconds", "")] == 1030.0
    assert v[("stillhouse_redistill_last_run_timestamp_seconds", "")] == 1030.0
    assert v[("stillhouse_redistill_last_run_duration_seconds", "")] == 30.0
    assert v[("stillhouse_redistill_last_run_success", "")] == 0.0


def test_before_any_failure_there_is_no_failure_timestamp(tmp_path: Path):
    path = tmp_path / "redistill.prom"
    write_redistill_metrics(path, 0.0, 5.0, success=True)
    assert ("stillhouse_redistill_last_failure_timestamp_seconds", "") not in _values(path)
    assert read_history(path) == RedistillHistory(1.0, 0.0, 5.0, None)


def test_an_unreadable_previous_file_starts_the_counts_again(tmp_path: Path):
    path = tmp_path / "redistill.prom"
    path.write_text("garbage { here\n")
    assert read_history(path) == RedistillHistory()
    write_redistill_metrics(path, 0.0, 1.0, success=True)
    assert _values(path)[("stillhouse_redistill_runs_total", "success")] == 1.0


def test_recording_run_records_a_failure_and_reraises_it(tmp_path: Path):
    path = tmp_path / "redistill.prom"
    clock = iter([10.0, 25.0]).__next__
    with pytest.raises(RuntimeError, match="teacher down"), recording_run(path, clock):
        raise RuntimeError("teacher down")
    assert read_history(path) == RedistillHistory(0.0, 1.0, None, 25.0)


def test_recording_run_records_a_success_and_an_interrupt_records_nothing(tmp_path: Path):
    path = tmp_path / "redistill.prom"
    with recording_run(path):
        pass
    assert read_history(path).successes == 1.0
    with pytest.raises(KeyboardInterrupt), recording_run(path):
        raise KeyboardInterrupt
    assert read_history(path).successes == 1.0 and read_history(path).failures == 0.0


def test_a_metrics_dir_that_cannot_be_written_never_fails_the_run(tmp_path: Path):
    blocker = tmp_path / "metrics"
    blocker.write_text("a file where the directory should be")
    with recording_run(blocker / "redistill.prom"):
        pass  # no exception: the run's own outcome is what matters
