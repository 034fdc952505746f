"""The registry client against a real MLflow with a SQLite store in a temp dir (no network):
reference parsing, registration, tag lookups, aliases, the download cache, error translation,
and the `registry list` table."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from stillhouse.common.registry import (
    ModelRef,
    RegistryClient,
    RegistryError,
    VersionInfo,
    parse_ref,
    versions_table,
)

MODEL = "stillhouse-student"


def make_model_dir(path: Path, marker: str) -> Path:
    """A stand-in for a transformers directory: what matters is its layout and bytes."""
    (path / "tokenizer").mkdir(parents=True)
    (path / "config.json").write_text(f'{{"model_type": "llama", "marker": "{marker}"}}')
    (path / "model.safetensors").write_bytes(marker.encode() * 257)
    (path / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass
class World:
    registry: RegistryClient
    mlflow: Any  # MlflowClient, for creating runs the way training does
    experiment_id: str
    root: Path
    v1_dir: Path
    v2_dir: Path

    def new_run(self, **metrics: float) -> str:
        run_id = self.mlflow.create_run(self.experiment_id).info.run_id
        for key, value in metrics.items():
            self.mlflow.log_metric(run_id, key, value)
        return run_id


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """One SQLite store for the module (creating its schema takes seconds): two versions of the
    student, v2 registered after v1 and so holding `challenger`. The module runs in an empty
    working directory, so a regression that writes to `./mlruns` cannot litter the checkout."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield _populate(root, MlflowClient)


def _populate(root: Path, mlflow_client: Any) -> World:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    registry = RegistryClient(uri, MODEL, root / "mlartifacts")
    w = World(
        registry,
        mlflow_client(uri, registry_uri=uri),
        registry.ensure_experiment("stillhouse"),
        root,
        make_model_dir(root / "v1", "one"),
        make_model_dir(root / "v2", "two"),
    )
    common = {"teacher": "teacher-7", "config_hash": "c0ffee"}
    run_1 = w.new_run(accuracy=0.5)
    w.mlflow.log_metric(run_1, "accuracy", 0.81)
    registry.register_version(run_1, w.v1_dir, {**common, "dataset_hash": "aaa"})
    registry.register_version(
        w.new_run(accuracy=0.9), w.v2_dir, {**common, "dataset_hash": "bbb", "data_window": "wk47"}
    )
    return w


# -- references -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("models:/stillhouse-student@champion", ModelRef(MODEL, alias="champion")),
        ("models:/other-model/12", ModelRef("other-model", version=12)),
        ("  models:/stillhouse-student@challenger ", ModelRef(MODEL, alias="challenger")),
        ("champion", ModelRef(MODEL, alias="champion")),
        ("ab_test-2", ModelRef(MODEL, alias="ab_test-2")),
        ("3", ModelRef(MODEL, version=3)),
    ],
)
def test_valid_references_parse_to_name_and_alias_or_version(ref, expected):
    assert parse_ref(ref, MODEL) == expected


@pytest.mark.parametrize(
    ("ref", "hint"),
    [
        ("models:/stillhouse-student", "no version or alias"),
        ("models:/stillhouse-student/Production", "positive number"),
        ("models:/stillhouse-student/latest", "positive number"),
        ("models:/stillhouse-student/0", "positive number"),
        ("models:/@champion", "models:/NAME@ALIAS"),
        ("models:/stillhouse-student@", "invalid alias"),
        ("models:/stillhouse-student@v3", "reserved"),
        ("latest", "reserved"),
        ("runs:/abc/model", "models:/NAME@ALIAS"),
        ("/srv/models/student", "models:/NAME@ALIAS"),
        ("champ ion", "invalid alias"),
        ("", "models:/NAME@ALIAS"),
    ],
)
def test_invalid_references_raise_one_line_errors_that_show_the_accepted_forms(ref, hint):
    with pytest.raises(RegistryError) as err:
        parse_ref(ref, MODEL)
    assert hint in str(err.value)
    assert "\n" not in str(err.value)


def test_model_ref_prints_as_the_mlflow_uri():
    assert str(ModelRef(MODEL, alias="champion")) == "models:/stillhouse-student@champion"
    assert str(ModelRef(MODEL, version=4)) == "models:/stillhouse-student/4"


def test_a_model_name_that_cannot_be_quoted_into_filters_is_refused_up_front():
    with pytest.raises(RegistryError, match="invalid registered model name"):
        RegistryClient("sqlite:///unused.db", "it's-mine")


def test_constructing_a_client_does_no_io(tmp_path):
    # Nothing is connected or created until the first call: `stillhouse --help` stays fast.
    RegistryClient(f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}", MODEL, tmp_path / "art")
    RegistryClient("http://127.0.0.1:1", MODEL)
    assert list(tmp_path.iterdir()) == []


def test_from_settings_keeps_local_artifacts_in_the_state_dir_but_leaves_servers_alone(tmp_path):
    from stillhouse.common.config import MlflowSettings, Settings

    local = RegistryClient.from_settings(Settings(state_dir=tmp_path))
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert local.artifact_root == tmp_path / "mlartifacts"
    assert local.registered_model == MODEL
    server = Settings(state_dir=tmp_path, mlflow=MlflowSettings(tracking_uri="http://mlflow:5000"))
    assert RegistryClient.from_settings(server).artifact_root is None


# -- the table --------------------------------------------------------------------------------


def _version(version: int, aliases: tuple[str, ...], **metrics: float) -> VersionInfo:
    return VersionInfo(
        name=MODEL,
        version=version,
        aliases=aliases,
        created=datetime(2026, 11, 20 + version, 2, 0, tzinfo=UTC),
        run_id=f"run{version}",
        source=f"runs:/run{version}/model",
        tags={"teacher": "teacher-7", "data_window": f"wk{45 + version}"},
        metrics=dict(metrics),
    )


def render(table) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(table)
    return console.export_text()


def test_versions_table_shows_versions_aliases_created_metrics_and_key_tags():
    versions = [
        _version(2, ("challenger",), accuracy=0.91234, kl=0.1),
        _version(1, ("champion", "stable"), accuracy=0.8),
    ]
    text = render(versions_table(versions, ["accuracy", "kl"]))
    header = text.splitlines()[1]
    for column in ("version", "aliases", "created", "accuracy", "kl", "teacher", "data_window"):
        assert column in header
    row2, row1 = (line for line in text.splitlines() if "teacher-7" in line)
    assert "challenger" in row2 and "0.9123" in row2 and "wk47" in row2 and "2026-11-22" in row2
    assert "champion, stable" in row1 and "0.8" in row1
    assert row1.split("│")[5].strip() == "-"  # v1 has no kl metric


def test_versions_table_says_so_when_nothing_is_registered():
    assert "no versions registered" in render(versions_table([], ["accuracy"]))


def test_versions_table_does_not_interpret_tag_values_as_markup():
    v = _version(1, ())
    v.tags["teacher"] = "[red]t[/red]"
    assert "[red]t[/red]" in render(versions_table([v], []))


# -- registration, lookup and aliases (SQLite) -----------------------------------------------


def test_experiment_artifacts_live_under_the_artifact_root_not_the_working_directory(world):
    exp = world.mlflow.get_experiment(world.experiment_id)
    assert exp.artifact_location == (world.root / "mlartifacts" / "stillhouse").as_uri()
    logged = list((world.root / "mlartifacts").rglob("model/config.json"))
    assert len(logged) == 2
    assert world.registry.ensure_experiment("stillhouse") == world.experiment_id


def test_each_registration_is_a_new_version_and_the_challenger_alias_moves_to_it(world):
    assert world.registry.resolve("challenger").version == 2
    assert world.registry.resolve(f"models:/{MODEL}/1").aliases == ()


def test_versions_are_listed_newest_first_with_aliases_tags_and_latest_metrics(world):
    versions = [v for v in world.registry.list_versions() if v.version <= 2]
    assert [v.version for v in versions] == [2, 1]
    assert versions[0].aliases == ("challenger",)
    assert versions[1].metrics == {"accuracy": 0.81}  # the run's latest value, not the first
    assert versions[0].tags["dataset_hash"] == "bbb"
    assert versions[0].source == f"runs:/{versions[0].run_id}/model"
    assert versions[0].created >= versions[1].created


def test_find_version_matches_all_given_tags(world):
    found = world.registry.find_version({"dataset_hash": "aaa", "config_hash": "c0ffee"})
    assert found is not None and found.version == 1
    assert world.registry.find_version({"dataset_hash": "aaa", "config_hash": "other"}) is None
    assert world.registry.find_version({"dataset_hash": "zzz"}) is None


def test_find_version_returns_the_newest_of_several_matches_with_its_aliases(world):
    found = world.registry.find_version({"teacher": "teacher-7"})
    assert found is not None
    assert (found.version, found.aliases) == (2, ("challenger",))


def test_resolve_accepts_alias_and_version_forms(world):
    reg = world.registry
    assert reg.resolve(f"models:/{MODEL}@challenger").version == 2
    assert reg.resolve("challenger").version == 2
    assert reg.resolve(f"models:/{MODEL}/1").version == 1
    assert reg.resolve("1").run_id == reg.resolve(f"models:/{MODEL}/1").run_id


def test_a_missing_alias_is_a_one_line_error_naming_model_and_alias(world):
    with pytest.raises(RegistryError) as err:
        world.registry.resolve("champion")
    assert str(err.value) == f"no version of {MODEL} has alias 'champion'"


def test_a_missing_version_is_a_one_line_error(world):
    with pytest.raises(RegistryError, match=f"^{MODEL} has no version 99$"):
        world.registry.resolve("99")
    with pytest.raises(RegistryError, match="has no version 99"):
        world.registry.set_alias("champion", 99)


def test_aliases_can_be_set_moved_read_and_deleted(world):
    reg = RegistryClient(world.registry.tracking_uri, "alias-playground", world.root / "mla")
    first = reg.register_version(world.new_run(), world.v1_dir, {"n": "1"}, alias=None)
    second = reg.register_version(world.new_run(), world.v2_dir, {"n": "2"}, alias=None)
    assert reg.get_alias("champion") is None
    reg.set_alias("champion", first.version)
    assert reg.get_alias("champion").version == first.version
    reg.set_alias("champion", second.version)
    assert reg.get_alias("champion").version == second.version
    assert reg.resolve(str(first.version)).aliases == ()
    reg.delete_alias("champion")
    assert reg.get_alias("champion") is None
    reg.delete_alias("champion")  # deleting an alias nobody holds is not an error


def test_version_tags_can_be_added_after_registration(world):
    reg = RegistryClient(world.registry.tracking_uri, "tag-playground", world.root / "mla")
    v = reg.register_version(world.new_run(), world.v1_dir, {"dataset_hash": "x"})
    reg.set_version_tags(v.version, {"gate": "passed"})
    assert reg.find_version({"gate": "passed"}).tags == {"dataset_hash": "x", "gate": "passed"}


def test_registering_a_directory_without_config_json_is_refused_before_logging(world, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    run_id = world.new_run()
    with pytest.raises(RegistryError, match=r"no config\.json"):
        world.registry.register_version(run_id, tmp_path, {})
    assert world.mlflow.list_artifacts(run_id) == []


def test_registering_against_an_unknown_run_names_the_run(world):
    with pytest.raises(RegistryError, match="no MLflow run 0123abcd"):
        world.registry.register_version("0123abcd", world.v1_dir, {})


def test_nothing_is_written_to_the_working_directory(world, tmp_path, monkeypatch):
    # MLflow falls back to ./mlruns and ./mlflow.db in several places; none may be reached.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    reg = RegistryClient(world.registry.tracking_uri, "cwd-check", world.root / "mla")
    exp_id = reg.ensure_experiment("cwd-check")
    run_id = world.mlflow.create_run(exp_id).info.run_id
    reg.register_version(run_id, world.v1_dir, {})
    reg.download("challenger", tmp_path / "cache")
    assert list(cwd.iterdir()) == []


# -- download cache ---------------------------------------------------------------------------


def test_download_returns_the_model_directory_byte_for_byte(world, tmp_path):
    path = world.registry.download(f"models:/{MODEL}@challenger", tmp_path)
    assert path == tmp_path / MODEL / "2"
    assert tree(path) == tree(world.v2_dir)


def test_a_second_download_uses_the_cache_without_fetching(world, tmp_path, monkeypatch):
    reg = world.registry
    first = reg.download("1", tmp_path)

    def no_fetch(*_: object) -> Path:
        raise AssertionError("fetched again")

    monkeypatch.setattr(reg, "_fetch_artifacts", no_fetch)
    assert reg.download(f"models:/{MODEL}/1", tmp_path) == first
    assert tree(first) == tree(world.v1_dir)


def test_a_cached_version_number_is_served_even_when_mlflow_is_down(world, tmp_path, monkeypatch):
    reg = RegistryClient(world.registry.tracking_uri, MODEL)
    cached = reg.download("1", tmp_path)
    monkeypatch.setattr(reg, "_mlflow", _Raising(_refused()))
    assert reg.download(f"models:/{MODEL}/1", tmp_path) == cached
    with pytest.raises(RegistryError, match="cannot reach MLflow"):
        reg.download("challenger", tmp_path)  # an alias can move: it is always looked up


def test_an_interrupted_download_leaves_nothing_that_looks_complete(world, tmp_path, monkeypatch):
    reg = world.registry
    real_fetch = reg._fetch_artifacts

    def dies_halfway(info: VersionInfo, dst: Path) -> Path:
        (dst / "config.json").write_text("{")
        raise OSError("connection reset by peer")

    monkeypatch.setattr(reg, "_fetch_artifacts", dies_halfway)
    with pytest.raises(RegistryError, match="connection reset"):
        reg.download("challenger", tmp_path)
    assert list((tmp_path / MODEL).iterdir()) == []  # no version dir, no leftover temp dir

    monkeypatch.setattr(reg, "_fetch_artifacts", real_fetch)
    assert tree(reg.download("challenger", tmp_path)) == tree(world.v2_dir)


def test_an_unusable_cache_directory_is_a_one_line_error(world, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(RegistryError) as err:
        world.registry.download("challenger", blocker)
    assert str(err.value).startswith(f"download models:/{MODEL}/2 into {blocker} failed: ")
    assert "\n" not in str(err.value)


def test_a_version_whose_files_are_not_a_model_directory_is_not_cached(world, tmp_path):
    run_id = world.new_run()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("not a model")
    world.mlflow.log_artifacts(run_id, str(notes), "notes")
    world.mlflow.create_registered_model("not-a-model")
    world.mlflow.create_model_version("not-a-model", f"runs:/{run_id}/notes", run_id)
    reg = RegistryClient(world.registry.tracking_uri, "not-a-model")
    with pytest.raises(RegistryError, match=r"no config\.json"):
        reg.download("1", tmp_path / "cache")
    assert list((tmp_path / "cache" / "not-a-model").iterdir()) == []


# -- error translation ------------------------------------------------------------------------


class _Raising:
    """Stands in for MlflowClient: every method raises `error` (and records the HTTP env)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.env: dict[str, str | None] = {}

    def __getattr__(self, name: str):
        def call(*_: object, **__: object) -> None:
            self.env = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",)}
            raise self.error

        return call


def _refused() -> Exception:
    import requests
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as inner:
            raise requests.ConnectionError("Max retries exceeded") from inner
    except requests.ConnectionError as outer:
        try:
            raise MlflowException("API request to http://x failed with exception ...") from outer
        except MlflowException as e:
            return e
    raise AssertionError("unreachable")


def test_connection_refused_deep_in_the_cause_chain_becomes_cannot_reach(monkeypatch):
    reg = RegistryClient("http://mlflow.internal:5000", MODEL, http_retries=1)
    fake = _Raising(_refused())
    monkeypatch.setattr(reg, "_mlflow", fake)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with pytest.raises(RegistryError) as err:
        reg.list_versions()
    assert (
        str(err.value) == "cannot reach MLflow at http://mlflow.internal:5000: connection refused"
    )
    assert fake.env == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # our limit applied to the call
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # and restored afterwards


def test_a_retry_limit_set_by_the_user_wins_over_the_clients(monkeypatch):
    reg = RegistryClient("http://mlflow.internal:5000", MODEL, http_retries=1)
    fake = _Raising(_refused())
    monkeypatch.setattr(reg, "_mlflow", fake)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    with pytest.raises(RegistryError):
        reg.resolve("champion")
    assert fake.env == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_other_mlflow_errors_keep_their_first_line_and_drop_the_error_code(monkeypatch):
    from mlflow.exceptions import RestException

    reg = RegistryClient("http://mlflow.internal:5000", MODEL)
    # What the REST store raises for a server's JSON error body.
    error = RestException({"error_code": "PERMISSION_DENIED", "message": "user may not\nat ..."})
    monkeypatch.setattr(reg, "_mlflow", _Raising(error))
    with pytest.raises(RegistryError) as err:
        reg.set_alias("champion", 3)
    assert str(err.value) == "set alias 'champion' failed: user may not"


def test_programming_errors_are_not_disguised_as_registry_errors(monkeypatch):
    reg = RegistryClient("http://mlflow.internal:5000", MODEL)
    monkeypatch.setattr(reg, "_mlflow", _Raising(TypeError("bug")))
    with pytest.raises(TypeError):
        reg.list_versions()
