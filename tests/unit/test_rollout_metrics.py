"""The rollout controller's /metrics: rollout state from its store, the batch jobs' text files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stillhouse.common.errors import UsageError
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.controller.core import (
    ControllerState,
    GateLook,
    Observation,
    Phase,
    Promote,
    RollBack,
    SetShare,
)
from stillhouse.rollout.controller.metrics import (
    DecisionCounts,
    JobFilesCollector,
    MetricsServer,
    controller_registry,
    counts_from_rows,
    merge_families,
    rollout_families,
    serve_controller_metrics,
)
from stillhouse.rollout.controller.store import ControllerStore

CFG = ControllerSettings(steps=(0.05, 0.25, 0.5), metrics_port=0)


def _samples(families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _samples(text_string_to_metric_families(generate_latest(registry).decode()))


def test_phase_is_one_hot_and_the_step_counts_from_one_in_ramp():
    state = ControllerState(phase=Phase.RAMP, version=7, step=1, share=0.25)
    got = _samples(rollout_families(state, CFG, DecisionCounts(), None, None))
    phases = {dict(k[1])["phase"]: v for k, v in got.items() if k[0] == "stillhouse_rollout_phase"}
    assert phases == {p.value: float(p is Phase.RAMP) for p in Phase}
    # The label values the dashboards and alerts match on (the mirror phase is no "shadow").
    assert set(phases) == {"idle", "calibrating", "mirror", "ramp", "promoted", "rolled_back"}
    assert got[("stillhouse_rollout_step", ())] == 2.0
    assert got[("stillhouse_rollout_steps", ())] == 3.0
    assert got[("stillhouse_rollout_challenger_version", ())] == 7.0


def test_outside_the_ramp_the_step_is_zero_and_absent_times_are_not_faked():
    got = _samples(rollout_families(ControllerState(), CFG, DecisionCounts(), None, None))
    assert got[("stillhouse_rollout_step", ())] == 0.0
    assert got[("stillhouse_rollout_challenger_version", ())] == 0.0
    assert got[("stillhouse_rollout_promotions_total", ())] == 0.0
    names = {k[0] for k in got}
    assert "stillhouse_rollout_last_promotion_timestamp_seconds" not in names
    assert "stillhouse_rollout_gate_status" not in names
    assert "stillhouse_rollout_last_tick_timestamp_seconds" not in names


def test_gate_status_comes_from_the_last_look_per_gate():
    numbers = {
        "gate.status": -1.0,
        "gate.not_worse.status": 1.0,
        "gate.srm.status": -1.0,
        "gate.latency.status": 0.0,
        "gate.latency.n": 12.0,
    }
    gates = GateLook("fail", numbers)
    got = _samples(rollout_families(ControllerState(), CFG, DecisionCounts(), gates, 5.0))
    status = {
        dict(k[1])["gate"]: v for k, v in got.items() if k[0] == "stillhouse_rollout_gate_status"
    }
    assert status == {"not_worse": 1.0, "srm": -1.0, "latency": 0.0}
    assert got[("stillhouse_rollout_last_tick_timestamp_seconds", ())] == 5.0


def test_counts_from_rows_takes_promotions_and_rollbacks_apart():
    assert counts_from_rows([("promote", 2, 50.0), ("rollback", 3, 70.0)]) == DecisionCounts(
        2, 3, 50.0, 70.0
    )
    assert counts_from_rows([]) == DecisionCounts()


def test_the_controllers_registry_counts_executed_decisions_from_its_journal(tmp_path: Path):
    store = ControllerStore.open(tmp_path / "controller")
    collector, controllers = controller_registry(tmp_path / "metrics", store, CFG)
    assert serve_controller_metrics(controllers, CFG) is None  # metrics_port 0: off
    registry = CollectorRegistry()
    registry.register(collector)
    state = ControllerState(phase=Phase.PROMOTED, version=4, decided=frozenset({3, 4}))
    gates = {"gate.status": 1.0, "gate.srm.status": 1.0, "gate.latency.status": 0.0}
    decided = [RollBack(3, "worse", at=10.0), SetShare(0.0), Promote(4, "ok", gates, at=20.0)]
    store.commit(state, decided, ts=100.0)
    got = _scrape(registry)
    assert got[("stillhouse_rollout_promotions_total", ())] == 0.0  # journaled, not yet run
    for row in store.pending():
        store.mark_done(row.id)
    got = _scrape(registry)  # no look by this process yet: the gates behind the promotion
    assert got[("stillhouse_rollout_gate_status", (("gate", "srm"),))] == 1.0
    assert got[("stillhouse_rollout_gate_status", (("gate", "latency"),))] == 0.0
    collector.observed(Observation(now=123.0, challenger_version=None))
    got = _scrape(registry)
    assert got[("stillhouse_rollout_promotions_total", ())] == 1.0
    assert got[("stillhouse_rollout_rollbacks_total", ())] == 1.0
    assert got[("stillhouse_rollout_last_promotion_timestamp_seconds", ())] == 100.0
    assert got[("stillhouse_rollout_phase", (("phase", "promoted"),))] == 1.0
    assert got[("stillhouse_rollout_last_tick_timestamp_seconds", ())] == 123.0


AB = """# HELP stillhouse_ab_srm_alarm 1 when the sample ratio mismatches the share.
# TYPE stillhouse_ab_srm_alarm gauge
stillhouse_ab_srm_alarm 0.0
# HELP stillhouse_eval_last_run_timestamp_seconds When this evaluation job last finished.
# TYPE stillhouse_eval_last_run_timestamp_seconds gauge
stillhouse_eval_last_run_timestamp_seconds{job="ab"} 100.0
"""
DRIFT = """# HELP stillhouse_eval_last_run_timestamp_seconds When this evaluation job last finished.
# TYPE stillhouse_eval_last_run_timestamp_seconds gauge
stillhouse_eval_last_run_timestamp_seconds{job="drift"} 200.0
"""


def test_job_files_with_the_same_family_are_merged_into_one_family():
    families = merge_families([AB, DRIFT])
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    got = _samples(families)
    assert got[("stillhouse_eval_last_run_timestamp_seconds", (("job", "ab"),))] == 100.0
    assert got[("stillhouse_eval_last_run_timestamp_seconds", (("job", "drift"),))] == 200.0


def test_job_files_collector_serves_every_prom_file_and_skips_a_broken_one(tmp_path: Path):
    (tmp_path / "ab.prom").write_text(AB)
    (tmp_path / "drift.prom").write_text(DRIFT)
    (tmp_path / "notes.txt").write_text("not metrics")
    registry = CollectorRegistry()
    registry.register(JobFilesCollector(tmp_path))
    got = _scrape(registry)
    assert got[("stillhouse_ab_srm_alarm", ())] == 0.0
    assert ("stillhouse_eval_last_run_timestamp_seconds", (("job", "drift"),)) in got
    (tmp_path / "broken.prom").write_text("this is { not exposition\n")
    assert _scrape(registry) == got  # logged and left out; the other files still served
    assert list(JobFilesCollector(tmp_path / "missing").collect()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_server_serves_the_registry_and_a_taken_port_is_one_clear_error(tmp_path: Path):
    (tmp_path / "ab.prom").write_text(AB)
    port = _free_port()
    cfg = ControllerSettings(metrics_port=port)
    store = ControllerStore.open(tmp_path / "controller")
    server = serve_controller_metrics(controller_registry(tmp_path, store, cfg)[1], cfg)
    assert server is not None
    try:
        text = httpx.get(server.url, timeout=10).text
        assert 'stillhouse_rollout_phase{phase="idle"} 1.0' in text
        assert "stillhouse_ab_srm_alarm 0.0" in text
        with pytest.raises(UsageError, match=f"127.0.0.1:{port}.*metrics_port"):
            MetricsServer(CollectorRegistry(), "127.0.0.1", port)
    finally:
        server.close()


def test_a_second_controller_is_refused_by_the_lock_before_it_binds_the_metrics_port(
    tmp_path: Path,
):
    """The port is bound only once the lock is held: with both taken, the one line a user sees
    names the running controller, not a port to change."""
    import subprocess
    import sys

    import yaml

    from stillhouse.rollout.controller.store import controller_lock

    state = tmp_path / "state"
    with socket.socket() as taken, controller_lock(state / "controller"):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "stillhouse.yaml"
        port = taken.getsockname()[1]
        config.write_text(
            yaml.safe_dump(
                {"state_dir": str(state), "rollout": {"controller": {"metrics_port": port}}}
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "stillhouse", "--config", str(config), "controller"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "STILLHOUSE_ADMIN_KEY": "sk-admin"},
        )
    assert done.returncode != 0
    assert f"another rollout controller (pid {os.getpid()}) holds" in done.stderr, done.stderr
    assert "metrics_port" not in done.stderr and "Traceback" not in done.stderr
