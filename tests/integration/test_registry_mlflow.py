"""The registry client against a real `mlflow server` on loopback: artifacts go up and come back
through the server's artifact proxy, aliases move over REST, an unreachable server fails fast
with one line, and stopping the server leaves no process of its group behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stillhouse.common.registry import RegistryClient, RegistryError, RegistryUnreachable

pytestmark = pytest.mark.slow

MODEL = "stillhouse-student"
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass
class Server:
    url: str
    artifacts: Path
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, SIGKILL after the grace period."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory, group_processes) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    # The job runner starts a handful of huey consumers we do not need on a 2-core machine.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not ready in {READY_TIMEOUT_S} s:\n{log_tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield Server(url, root / "artifacts", proc)
    finally:
        stop_group(proc)
    assert group_processes(proc.pid) == [], "mlflow server processes survived the stop"


def make_model_dir(path: Path, marker: str) -> Path:
    (path / "tokenizer").mkdir(parents=True)
    (path / "config.json").write_text(f'{{"model_type": "llama", "marker": "{marker}"}}')
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 40 + marker.encode())
    (path / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass
class Registered:
    registry: RegistryClient
    v1_dir: Path
    v2_dir: Path


@pytest.fixture(scope="module")
def registered(server: Server, tmp_path_factory) -> Registered:
    """Two versions registered through the server, with different tags; v2 is the challenger."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("students")
    registry = RegistryClient(server.url, MODEL, artifact_root=None)
    experiment_id = registry.ensure_experiment("stillhouse")
    runs = MlflowClient(server.url, registry_uri=server.url)
    dirs = []
    for n, accuracy in ((1, 0.7), (2, 0.8)):
        run_id = runs.create_run(experiment_id).info.run_id
        runs.log_metric(run_id, "accuracy", accuracy)
        model_dir = make_model_dir(root / f"v{n}", f"student-{n}")
        registry.register_version(run_id, model_dir, {"dataset_hash": f"d{n}", "teacher": "t"})
        dirs.append(model_dir)
    return Registered(registry, *dirs)


def test_a_second_registration_becomes_the_challenger(registered):
    reg = registered.registry
    challenger = reg.resolve(f"models:/{MODEL}@challenger")
    assert challenger.version == 2
    assert challenger.tags == {"dataset_hash": "d2", "teacher": "t"}
    assert reg.resolve(f"models:/{MODEL}/1").aliases == ()


def test_aliases_move_between_versions_over_rest(registered):
    reg = registered.registry
    reg.set_alias("champion", 1)
    assert reg.get_alias("champion").version == 1
    reg.set_alias("champion", 2)
    assert reg.resolve(f"models:/{MODEL}@champion").aliases == ("challenger", "champion")
    reg.delete_alias("champion")
    assert reg.get_alias("champion") is None


def test_versions_and_tag_lookups_work_through_the_server(registered):
    reg = registered.registry
    versions = reg.list_versions()
    assert [v.version for v in versions] == [2, 1]
    assert [v.metrics for v in versions] == [{"accuracy": 0.8}, {"accuracy": 0.7}]
    assert reg.find_version({"dataset_hash": "d1", "teacher": "t"}).version == 1
    assert reg.find_version({"dataset_hash": "d3"}) is None


def test_the_challenger_downloads_byte_for_byte_through_the_artifact_proxy(
    registered, server, tmp_path
):
    path = registered.registry.download(f"models:/{MODEL}@challenger", tmp_path)
    assert path == tmp_path / MODEL / "2"
    assert (path / "config.json").is_file()
    assert tree(path) == tree(registered.v2_dir)
    # The files went through the server into its artifacts destination, not to a client path.
    stored = list(server.artifacts.rglob("model/config.json"))
    assert len(stored) == 2


def test_a_missing_alias_over_rest_is_the_same_one_line_error(registered):
    with pytest.raises(RegistryError) as err:
        registered.registry.resolve(f"models:/{MODEL}@rollback")
    assert str(err.value) == f"no version of {MODEL} has alias 'rollback'"
    assert not isinstance(err.value, RegistryUnreachable)  # the registry's own answer


def test_an_unreachable_server_fails_within_seconds_with_one_line():
    url = f"http://127.0.0.1:{free_port()}"  # bound, then closed: nothing listens
    registry = RegistryClient(url, MODEL)  # the default (low) retry settings
    started = time.monotonic()
    with pytest.raises(RegistryUnreachable) as err:  # what the gateway's cache falls back on
        registry.resolve("champion")
    elapsed = time.monotonic() - started
    assert str(err.value) == f"cannot reach MLflow at {url}: connection refused"
    assert elapsed < 10, f"took {elapsed:.1f} s"
