"""`stillhouse registry pull`, which deploy/README.md documents: download a registered
version's model directory (to serve it with a plain vLLM server, or to pre-fill a cache)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(state), "STILLHOUSE_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "stillhouse", *args], cwd=state, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_registry_pull_downloads_the_version_an_alias_names(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from stillhouse.common.config import Settings
    from stillhouse.common.registry import RegistryClient

    monkeypatch.chdir(tmp_path)
    settings = Settings(state_dir=tmp_path)
    registry = RegistryClient.from_settings(settings)
    run = MlflowClient(settings.tracking_uri).create_run(registry.ensure_experiment("stillhouse"))
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    registry.register_version(run.info.run_id, model, {"dataset_hash": "x"}, alias="champion")
    out = run_cli(["registry", "pull", "champion", "--dest", str(tmp_path / "models")], tmp_path)
    assert out.returncode == 0, out.stderr
    target = tmp_path / "models" / "stillhouse-student" / "1"
    assert out.stdout.strip() == f"models:/stillhouse-student/1 -> {target}"
    assert (target / "config.json").read_text() == '{"model_type": "llama"}'


def test_registry_pull_of_an_unset_alias_is_one_line_and_non_zero(tmp_path):
    out = run_cli(["registry", "pull", "challenger", "--dest", str(tmp_path / "m")], tmp_path)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: no version of stillhouse-student has alias 'challenger'"
    ]
