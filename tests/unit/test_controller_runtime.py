"""The controller's glue: what it observes in the registry and the traffic log, and what each
action does to the gateway (through its admin API) and the registry. A real MLflow registry
(SQLite in a temp dir) and a recording stand-in for the gateway's admin client."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stillhouse.common.config import Settings
from stillhouse.common.registry import RegistryClient
from stillhouse.common.traffic import INSERT_SQL, MIRROR, TrafficRecord, create_schema, to_row
from stillhouse.rollout.calibration.job import uncertified_tags
from stillhouse.rollout.controller.core import (
    Calibrate,
    ControllerState,
    Note,
    Phase,
    Promote,
    RollBack,
    SetMirror,
    SetShare,
)
from stillhouse.rollout.controller.runtime import ChallengerNotServing, ControllerRuntime
from stillhouse.rollout.gateway_admin import engine_entry

T0 = 1_800_000_000.0


@dataclass
class RecordingAdmin:
    engines_answer: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    split: dict[str, float] = field(
        default_factory=lambda: {"challenger_share": 0.0, "mirror_share": 0.0}
    )

    def ab(self) -> dict:
        return dict(self.split)

    def set_ab(self, *, share=None, mirror=None, actor: str) -> dict:
        self.calls.append(("set_ab", {"share": share, "mirror": mirror, "actor": actor}))
        if share is not None:
            self.split["challenger_share"] = share
        if mirror is not None:
            self.split["mirror_share"] = mirror
        return {}

    def engines(self) -> dict:
        self.calls.append(("engines", None))
        return self.engines_answer

    def refresh(self) -> dict:
        self.calls.append(("refresh", None))
        return {}


@pytest.fixture(scope="module")
def registry_settings(tmp_path_factory) -> Iterator[Settings]:
    from mlflow import MlflowClient

    state = tmp_path_factory.mktemp("runtime")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        settings = Settings(state_dir=state)
        registry = RegistryClient.from_settings(settings)
        experiment = registry.ensure_experiment(settings.mlflow.experiment)
        client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
        model = state / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
        for i in range(3):
            run_id = client.create_run(experiment).info.run_id
            registry.register_version(run_id, model, {"n": str(i)}, alias=None)
        yield settings


def runtime(settings: Settings, admin: RecordingAdmin, lines: list[str]) -> ControllerRuntime:
    registry = RegistryClient.from_settings(settings)
    return ControllerRuntime(
        settings,
        admin,  # type: ignore[arg-type]
        registry,
        lines.append,
        clock=lambda: T0 + 100,
    )


def write_log(path: Path, records: list[TrafficRecord]) -> None:
    conn = sqlite3.connect(path)
    create_schema(conn)
    with conn:
        for record in records:
            conn.execute(INSERT_SQL[TrafficRecord], to_row(record))
    conn.close()


def rec(i: int, served_by: str, model: str, ts: float, status: int = 200) -> TrafficRecord:
    return TrafficRecord(
        request_id=f"r{i}",
        ts=ts,
        endpoint="chat",
        arm="challenger",
        served_by=served_by,
        status=status,
        latency_s=0.1,
        student_model=model,
    )


def test_share_and_mirror_go_to_the_gateway_admin_api(registry_settings):
    admin, lines = RecordingAdmin(), []
    rt = runtime(registry_settings, admin, lines)
    rt.execute(SetShare(0.05))
    rt.execute(SetMirror(1.0))
    rt.execute(Note("hello"))
    assert admin.calls == [
        ("set_ab", {"share": 0.05, "mirror": None, "actor": "controller"}),
        ("set_ab", {"share": None, "mirror": 1.0, "actor": "controller"}),
    ]
    assert lines == ["hello"]


def test_promote_moves_the_alias_and_asks_the_gateway_to_swap_now(registry_settings):
    registry = RegistryClient.from_settings(registry_settings)
    registry.set_alias("champion", 1)
    registry.set_alias("challenger", 2)
    admin, lines = RecordingAdmin(), []
    rt = runtime(registry_settings, admin, lines)
    rt.execute(Promote(2, "ramp-3/3 passed", {"gate.status": 1.0}, "ramp-3/3", at=T0))
    assert registry.get_alias("champion").version == 2
    assert registry.get_alias("previous-champion").version == 1
    assert registry.get_alias("challenger") is None
    assert admin.calls[-1] == ("refresh", None)
    tags = registry.resolve("2").tags
    assert tags["stillhouse.promotion.by"] == "controller:ramp-3/3"
    # the gates' keys start with `gate.`: recorded once, not as `gate.gate.`
    assert tags["stillhouse.promotion.gate.status"] == "1"
    assert not any(".gate.gate." in k for k in tags)


def test_rollback_records_the_reason_and_leaves_the_aliases(registry_settings):
    registry = RegistryClient.from_settings(registry_settings)
    registry.set_alias("champion", 1)
    registry.set_alias("challenger", 3)
    rt = runtime(registry_settings, RecordingAdmin(), [])
    rt.execute(RollBack(3, "win_or_tie failed", {"gate.status": -1.0}, "ramp-1/3", at=T0))
    assert registry.get_alias("challenger").version == 3
    assert registry.get_alias("champion").version == 1
    tags = registry.resolve("3").tags
    assert tags["stillhouse.rollout.outcome"] == "rolled_back"
    assert "win_or_tie failed" in tags["stillhouse.rollout.reason"]


def test_calibrate_waits_until_the_gateway_serves_that_version(registry_settings):
    admin = RecordingAdmin({"engines": {"teacher": {"base_url": "http://t/v1"}}})
    rt = runtime(registry_settings, admin, [])
    with pytest.raises(ChallengerNotServing, match="version 3"):
        rt.execute(Calibrate(3))
    assert ("refresh", None) in admin.calls


def test_a_calibrated_version_is_observed_and_not_calibrated_again(registry_settings):
    registry = RegistryClient.from_settings(registry_settings)
    registry.set_alias("challenger", 3)
    registry.set_version_tags(3, uncertified_tags(registry_settings, "nothing labelled"))
    admin, lines = RecordingAdmin(), []
    rt = runtime(registry_settings, admin, lines)
    state = ControllerState(phase=Phase.CALIBRATING, version=3, step_started_at=T0)
    obs = rt.observe(state)
    assert obs.challenger_version == 3
    assert obs.calibration is not None and obs.calibration.certified is False
    rt.execute(Calibrate(3))
    assert admin.calls == [] and "already calibrated" in lines[-1]


def test_samples_count_mirrored_answers_in_the_mirror_phase_and_served_ones_in_a_ramp(
    registry_settings,
):
    name = registry_settings.mlflow.registered_model
    model = f"models:/{name}/3"
    records = [
        rec(1, MIRROR, model, T0 + 1),
        rec(2, MIRROR, model, T0 + 2),
        rec(3, MIRROR, model, T0 + 3, status=502),  # failed: not an answer
        rec(4, "challenger", model, T0 + 4),
        rec(5, "teacher", model, T0 + 5),
        rec(6, MIRROR, f"models:/{name}/2", T0 + 6),  # another version
        rec(7, MIRROR, model, T0 - 50),  # before the step began
    ]
    write_log(registry_settings.traffic_log_path, records)
    rt = runtime(registry_settings, RecordingAdmin(), [])
    mirror = ControllerState(phase=Phase.MIRROR, version=3, step_started_at=T0)
    ramp = ControllerState(phase=Phase.RAMP, version=3, step_started_at=T0)
    assert rt.count_samples(mirror) == 2
    assert rt.count_samples(ramp) == 2  # served by the challenger, or by the teacher for it


def test_observe_reads_the_gateways_split_so_a_restarted_gateway_is_set_again(
    registry_settings: Settings,
):
    admin = RecordingAdmin(split={"challenger_share": 0.1, "mirror_share": 0.0})
    runtime = ControllerRuntime(
        registry_settings, admin, RegistryClient.from_settings(registry_settings), lambda _: None
    )
    obs = runtime.observe(ControllerState())
    assert obs.gateway_split == (0.1, 0.0)


def test_an_engine_entry_is_read_from_the_admin_answer_or_the_role_map_itself():
    teacher = {"base_url": "http://t/v1", "served_name": "teacher"}
    assert engine_entry({"engines": {"teacher": teacher}}, "teacher") == teacher
    assert engine_entry({"teacher": teacher}, "teacher") == teacher
    assert engine_entry({"engines": {"teacher": teacher}}, "challenger") is None
    assert engine_entry({"engines": {"challenger": None}}, "challenger") is None
    assert engine_entry({"engines": []}, "teacher") is None


def test_a_journaled_promotion_is_not_replayed_after_an_operators_rollback(tmp_path):
    import time

    from stillhouse.common.tracking import RunTracker
    from stillhouse.rollout.promotion import admin_actor, promote, rollback_champion

    settings = Settings(state_dir=tmp_path)
    registry = RegistryClient.from_settings(settings)
    experiment = registry.ensure_experiment(settings.mlflow.experiment)
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    for i in range(3):
        run_id = client.create_run(experiment).info.run_id
        registry.register_version(run_id, tmp_path / "model", {"n": str(i)}, alias=None)
    tracker = RunTracker(registry, settings.mlflow.experiment)
    decided_at = time.time() - 60  # the controller journaled "promote v3", then was killed
    promote(registry, tracker, 1, actor=admin_actor("ops"), reason="first", at=decided_at - 60)
    promote(registry, tracker, 2, actor=admin_actor("ops"), reason="second", at=decided_at - 30)
    rollback_champion(registry, tracker, actor=admin_actor("ops"), reason="bad v2")
    lines: list[str] = []
    rt = runtime(settings, RecordingAdmin(), lines)
    rt.execute(Promote(3, "ramp-4/4 passed", {}, "ramp-4/4", at=decided_at))  # the replay
    assert registry.get_alias("champion").version == 1  # the operator's rollback stands
    assert "not promoting v3 as decided: rollback of v2 by admin:ops" in lines[-1]
    rt.execute(Promote(3, "ramp-4/4 passed", {}, "ramp-4/4", at=time.time() + 1))  # a new one
    assert registry.get_alias("champion").version == 3


def test_a_calibration_that_cannot_run_is_given_up_after_its_timeout(registry_settings):
    import time

    from stillhouse.common.calibration_tags import read_calibration
    from stillhouse.rollout.controller.store import DecisionRow

    def journaled(action, age_s: float) -> DecisionRow:
        from stillhouse.rollout.controller.core import action_to_dict

        return DecisionRow(1, time.time() - age_s, 3, "calibrating", 0, action.kind, "", {},
                           action_to_dict(action), False)  # fmt: skip

    lines: list[str] = []
    rt = runtime(registry_settings, RecordingAdmin(), lines)
    limit = registry_settings.rollout.controller.calibrate_timeout_s
    stuck = ChallengerNotServing("waiting for the gateway to serve version 3 as the challenger")
    assert not rt.abandon(journaled(Calibrate(3), limit - 60), stuck)  # still within its time
    assert not rt.abandon(journaled(SetShare(0.1), 10 * limit), stuck)  # retried for ever
    assert rt.abandon(journaled(Calibrate(3), limit + 60), stuck)
    tags = RegistryClient.from_settings(registry_settings).resolve("3").tags
    found, _ = read_calibration(tags, registry_settings.gateway.confidence)
    assert found is not None and not found.certified  # so the controller rolls it back
    assert "calibration could not run for" in lines[-1] and "waiting for the gateway" in lines[-1]
