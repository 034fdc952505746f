"""`stillhouse redistill` end to end on the tiny demo world: real vLLM teacher and student,
MLflow on SQLite; duplicates are refused and a failed run registers nothing."""

from __future__ import annotations

import pytest
from rich.console import Console

from stillhouse.common.config import (
    DataSettings,
    MlflowSettings,
    RedistillSettings,
    StudentSettings,
    TrainingSettings,
)
from stillhouse.common.registry import RegistryClient
from stillhouse.demo.distill_hooks import demo_redistill_inputs
from stillhouse.rollout.distill.pipeline import redistill
from stillhouse.rollout.distill.targets import TeacherError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def configured(tiny_settings, tiny_world, tmp_path_factory):
    # Own state dir (target cache, runs, registry), the shared tiny demo world linked in.
    tmp = tmp_path_factory.mktemp("redistill")
    (tmp / "demo").symlink_to(tiny_world.root)
    bare = tiny_settings.model_copy(
        update={
            "state_dir": tmp,
            "mlflow": MlflowSettings(tracking_uri=f"sqlite:///{tmp}/mlflow.db"),
            "redistill": RedistillSettings(
                data=DataSettings(max_prompts=120),
                student=StudentSettings(hidden_size=64, intermediate_size=128, num_layers=1),
                training=TrainingSettings(epochs=2, batch_tokens=2048),
                sft_baseline=False,
            ),
        }
    )
    # What the demo plug-in gives `stillhouse redistill`: the world's prompts and teacher, and
    # the hooks that score students on its test split.
    return demo_redistill_inputs(bare, Console(quiet=True))


@pytest.fixture(scope="module")
def settings(configured):
    return configured[0]


@pytest.fixture(scope="module")
def hooks(configured):
    return configured[1]


@pytest.fixture(scope="module")
def first_run(settings, hooks):
    return redistill(settings, Console(quiet=True), hooks=hooks)


def test_a_run_registers_the_student_as_challenger_with_its_provenance(first_run, settings):
    v = first_run.version
    assert v is not None
    assert v.aliases == ("challenger",)
    for tag in ("dataset_hash", "config_hash", "teacher", "data_window", "teacher_fingerprint"):
        assert v.tags.get(tag), tag
    registry = RegistryClient.from_settings(settings)
    assert registry.get_alias("champion") is None  # promotion is a separate step
    assert registry.resolve("models:/stillhouse-student@challenger").version == v.version


def test_the_run_logs_epochs_served_accuracy_and_artifacts(first_run, settings):
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(first_run.version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["redistill.kd.divergence"] == "forward_kl"
    history = client.get_metric_history(run.info.run_id, "kd.heldout_kl")
    assert [m.step for m in history] == [1, 2]
    assert 0.0 <= run.data.metrics["kd.category_accuracy"] <= 1.0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "config.json", "loss.png", "model"} <= names


def test_the_registered_student_downloads_as_a_servable_directory(first_run, settings, tmp_path):
    path = RegistryClient.from_settings(settings).download(first_run.version.uri, tmp_path)
    assert (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_the_same_data_and_config_are_not_registered_twice(first_run, settings, hooks):
    again = redistill(settings, Console(quiet=True), hooks=hooks)
    assert again.version is None
    assert again.duplicate_of is not None
    assert again.duplicate_of.version == first_run.version.version
    assert len(RegistryClient.from_settings(settings).list_versions()) == 1


def test_a_failed_run_registers_nothing(first_run, settings, hooks):
    # a new request shape, so no target is cached and the teacher is asked
    teacher = settings.redistill.teacher.model_copy(
        update={"base_url": "http://127.0.0.1:9/v1", "retries": 0, "max_tokens": 63}
    )
    broken = settings.model_copy(
        update={"redistill": settings.redistill.model_copy(update={"teacher": teacher})}
    )
    with pytest.raises(TeacherError):
        redistill(broken, Console(quiet=True), hooks=hooks)
    registry = RegistryClient.from_settings(settings)
    assert [v.version for v in registry.list_versions()] == [first_run.version.version]
    from mlflow import MlflowClient

    runs = MlflowClient(settings.tracking_uri).search_runs(
        [registry.ensure_experiment(settings.mlflow.experiment)]
    )
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_registry_list_shows_the_version_and_its_alias(first_run, settings):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "COLUMNS": "80",  # a narrow terminal (or a pipe): the table must still show the alias
        "STILLHOUSE_STATE_DIR": str(settings.state_dir),
        "STILLHOUSE_MLFLOW__TRACKING_URI": settings.tracking_uri,
    }
    out = subprocess.run(
        [sys.executable, "-m", "stillhouse", "registry", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "challenger" in out.stdout
    assert str(first_run.version.version) in out.stdout
