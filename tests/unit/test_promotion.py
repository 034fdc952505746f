"""Promotion and rollback against a real MLflow (SQLite store in a temp dir, no network): aliases
move as documented, every decision leaves version tags and one MLflow run with its numbers, a
repeat after a crash is a no-op or finishes the record, and impossible requests fail in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from stillhouse.common.registry import RegistryClient, RegistryError
from stillhouse.common.tracking import RunTracker
from stillhouse.rollout.promotion import (
    PromotionError,
    admin_actor,
    promote,
    record_challenger_rollback,
    rollback_champion,
)

MODEL = "stillhouse-student"
EXPERIMENT = "stillhouse"
GATES = {"win_or_tie": 0.91, "noninferiority_lower": -0.04}
AT = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)


@dataclass
class World:
    registry: RegistryClient
    tracker: RunTracker
    mlflow: Any  # MlflowClient, to read back runs
    experiment_id: str

    def aliases(self) -> dict[str, int]:
        model = self.mlflow.get_registered_model(MODEL)
        return {alias: int(v) for alias, v in model.aliases.items()}

    def set_aliases(self, **aliases: int | None) -> None:
        for alias, version in aliases.items():
            name = alias.replace("_", "-")
            if version is None:
                self.registry.delete_alias(name)
            else:
                self.registry.set_alias(name, version)

    def tags(self, version: int) -> dict[str, str]:
        return self.registry.resolve(str(version)).tags

    def runs(self, name: str) -> list[Any]:
        found = self.mlflow.search_runs(
            [self.experiment_id], filter_string=f"attributes.run_name = '{name}'"
        )
        return list(found)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """One SQLite store for the module (its schema takes seconds), six versions without aliases;
    each test sets the aliases it starts from. Runs in an empty working directory, so nothing
    can land in the checkout's ./mlruns."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("promotion")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        registry = RegistryClient(uri, MODEL, root / "mlartifacts")
        client = MlflowClient(uri, registry_uri=uri)
        experiment_id = registry.ensure_experiment(EXPERIMENT)
        model_dir = root / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text('{"model_type": "llama"}')
        for i in range(6):
            run_id = client.create_run(experiment_id).info.run_id
            registry.register_version(run_id, model_dir, {"n": str(i + 1)}, alias=None)
        yield World(registry, RunTracker(registry, EXPERIMENT), client, experiment_id)


def test_promote_moves_champion_keeps_the_previous_drops_the_challenger_and_records_it(world):
    world.set_aliases(champion=1, challenger=2, previous_champion=None)
    record = promote(
        world.registry,
        world.tracker,
        2,
        actor="controller:ramp-4/4",
        reason="ramp-4/4 passed",
        metrics=GATES,
        at=AT,
    )
    assert world.aliases() == {"champion": 2, "previous-champion": 1}
    assert (record.version, record.from_version, record.already) == (2, 1, False)
    tags = world.tags(2)
    assert {k: v for k, v in tags.items() if k.startswith("stillhouse.")} == {
        "stillhouse.promotion.at": "2026-03-01T12:00:00.250+00:00",
        "stillhouse.promotion.by": "controller:ramp-4/4",
        "stillhouse.promotion.from_version": "1",
        "stillhouse.promotion.reason": "ramp-4/4 passed",
        "stillhouse.promotion.run_id": record.run_id,
        "stillhouse.promotion.gate.win_or_tie": "0.91",
        "stillhouse.promotion.gate.noninferiority_lower": "-0.04",
        "stillhouse.rollout.outcome": "promoted",
        "stillhouse.rollout.reason": "ramp-4/4 passed",
        "stillhouse.rollout.by": "controller:ramp-4/4",
        "stillhouse.rollout.at": "2026-03-01T12:00:00.250+00:00",
    }
    [run] = world.runs("promote-v2")
    assert run.info.run_id == record.run_id and run.info.status == "FINISHED"
    assert run.data.tags["stillhouse.job"] == "promotion"
    assert run.data.tags["stillhouse.version"] == "2"
    assert run.data.params == {
        "from_version": "1",
        "to_version": "2",
        "actor": "controller:ramp-4/4",
        "reason": "ramp-4/4 passed",
    }
    assert run.data.metrics == GATES

    again = promote(world.registry, world.tracker, 2, actor=admin_actor("ops"), reason="twice")
    assert again.already and (again.from_version, again.actor) == (1, "controller:ramp-4/4")
    assert len(world.runs("promote-v2")) == 1
    assert world.aliases() == {"champion": 2, "previous-champion": 1}
    assert "already recorded" in again.summary_line()


def test_a_promotion_interrupted_after_its_aliases_moved_is_finished_by_a_repeat(world):
    # What a kill -9 after `champion` moved leaves: previous-champion set, no record yet.
    world.set_aliases(champion=3, previous_champion=2, challenger=3)
    record = promote(world.registry, world.tracker, 3, actor="controller:ramp-4/4", reason="ok")
    assert (record.from_version, record.already) == (2, False)
    assert world.aliases() == {"champion": 3, "previous-champion": 2}
    assert world.tags(3)["stillhouse.promotion.from_version"] == "2"
    assert len(world.runs("promote-v3")) == 1


def test_promoting_by_hand_leaves_another_versions_challenger_alias_alone(world):
    world.set_aliases(champion=1, challenger=4, previous_champion=None)
    record = promote(world.registry, world.tracker, 5, actor=admin_actor("ops"), reason="hotfix")
    assert world.aliases() == {"champion": 5, "previous-champion": 1, "challenger": 4}
    assert record.actor == "admin:ops"
    assert world.tags(5)["stillhouse.promotion.by"] == "admin:ops"


def test_promoting_a_missing_version_fails_in_one_line_and_changes_nothing(world):
    world.set_aliases(champion=1, challenger=4, previous_champion=None)
    with pytest.raises(RegistryError) as err:
        promote(world.registry, world.tracker, 99, actor="admin:ops", reason="typo")
    assert "no version 99" in str(err.value) and "\n" not in str(err.value)
    assert world.aliases() == {"champion": 1, "challenger": 4}


def test_rollback_restores_the_previous_champion_once_and_records_it(world):
    world.set_aliases(champion=5, previous_champion=1, challenger=None)
    record = rollback_champion(
        world.registry, world.tracker, actor="admin:ops", reason="complaints", at=AT
    )
    assert world.aliases() == {"champion": 1}
    assert (record.version, record.from_version) == (5, 1)
    tags = world.tags(5)
    assert tags["stillhouse.rollback.to_version"] == "1"
    assert tags["stillhouse.rollback.by"] == "admin:ops"
    assert tags["stillhouse.rollback.reason"] == "complaints"
    assert tags["stillhouse.rollback.at"] == "2026-03-01T12:00:00.250+00:00"
    [run] = world.runs("rollback-v5")
    assert run.info.run_id == tags["stillhouse.rollback.run_id"]
    assert run.data.tags["stillhouse.job"] == "rollback"
    assert run.data.params["from_version"] == "5" and run.data.params["to_version"] == "1"

    with pytest.raises(PromotionError) as err:
        rollback_champion(world.registry, world.tracker, actor="admin:ops", reason="again")
    message = str(err.value)
    assert "cannot roll back champion v1" in message and "previous-champion" in message
    assert "\n" not in message
    assert world.aliases() == {"champion": 1}


def test_rollback_without_a_champion_fails_in_one_line(world):
    world.set_aliases(champion=None, previous_champion=1, challenger=None)
    with pytest.raises(PromotionError, match="no version holds the `champion` alias"):
        rollback_champion(world.registry, world.tracker, actor="admin:ops", reason="x")
    assert world.aliases() == {"previous-champion": 1}


def test_a_challenger_rollback_records_tags_and_a_run_and_leaves_every_alias_alone(world):
    world.set_aliases(champion=1, challenger=6, previous_champion=None)
    numbers = {"win_or_tie": 0.41, "noninferiority_lower": -0.35}
    record = record_challenger_rollback(
        world.registry,
        world.tracker,
        6,
        actor="controller:ramp-1/4",
        reason="gates failed at ramp-1/4",
        metrics=numbers,
        at=AT,
    )
    assert world.aliases() == {"champion": 1, "challenger": 6}
    tags = world.tags(6)
    assert tags["stillhouse.rollout.outcome"] == "rolled_back"
    assert tags["stillhouse.rollout.reason"] == "gates failed at ramp-1/4"
    assert tags["stillhouse.rollout.by"] == "controller:ramp-1/4"
    assert tags["stillhouse.rollout.gate.win_or_tie"] == "0.41"
    assert tags["stillhouse.rollout.at"] == "2026-03-01T12:00:00.250+00:00"
    [run] = world.runs("rollout-rollback-v6")
    assert run.info.run_id == record.run_id == tags["stillhouse.rollout.run_id"]
    assert run.data.metrics == numbers
    assert run.data.tags["stillhouse.job"] == "rollout-rollback"

    # The controller re-executing the same journaled decision after a crash records nothing new.
    again = record_challenger_rollback(
        world.registry, world.tracker, 6, actor="controller:ramp-1/4", reason="x", at=AT
    )
    assert again.already and again.run_id == record.run_id
    assert len(world.runs("rollout-rollback-v6")) == 1


def test_summary_lines_say_what_moved_and_who_moved_it(world):
    world.set_aliases(champion=1, challenger=4, previous_champion=None)
    record = promote(world.registry, world.tracker, 4, actor="admin:ops", reason="good numbers")
    assert record.summary_line() == "v4 is champion (was v1) by admin:ops: good numbers"
