"""Cases 5 and 12 with a real `mlflow server`, a real `stillhouse serve` whose students follow
the registry's aliases (the champion a real vLLM server on the tiny teacher's weights), and a
fake teacher.

- 12: the challenger alias names a version the controller rolled back (its own
  `record_challenger_rollback`). A gateway with the default A/B settings (share 0.1) sends
  requests from 200 users to the champion only, and never starts the challenger.
- 5: MLflow is stopped; the restarted gateway starts on the version the alias last named, from
  the cached weights, answers, and says so in /admin/engines; MLflow comes back on the same
  port, and one poll later the gateway watches again.

Both share one test: each gateway start is a vLLM start (about a minute here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import ADMIN_KEY, GatewayProcess

from stillhouse.common.config import Settings
from stillhouse.common.prompts import triage_user_message
from stillhouse.common.registry import RegistryClient
from stillhouse.common.tracking import RunTracker
from stillhouse.rollout.promotion import record_challenger_rollback
from stillhouse.serving.engines.vllm import free_port

pytestmark = pytest.mark.slow

MODEL = "outage-student"
CHAMPION = f"models:/{MODEL}@champion"
MLFLOW_READY_S = 120.0
ENGINE_START_S = 480.0  # a gateway whose champion is a vLLM server: one start, loaded machine
USERS = 200  # at the default share 0.1, about 20 would meet a challenger that is served


class MlflowServer:
    """`mlflow server` on a fixed port and store, so it can be stopped and started again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.root / "mlflow.log").open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + MLFLOW_READY_S
        while True:
            assert self.proc.poll() is None, f"mlflow server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"mlflow server not ready in {MLFLOW_READY_S} s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def mlflow_server(tmp_path, group_processes) -> Iterator[MlflowServer]:
    root = tmp_path / "mlflow"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    pgids: list[int] = []
    try:
        yield server
    finally:
        if server.proc is not None:
            pgids.append(server.proc.pid)
        server.stop()
    assert all(group_processes(p) == [] for p in pgids)


def admin(gp: GatewayProcess) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.get(gp.url + "/admin/engines", headers=headers, timeout=10).json()


def until(
    gp: GatewayProcess, check: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 60
) -> dict[str, Any]:
    """/admin/engines once `check` holds on it (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = admin(gp)
        if check(state):
            return state
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s: {state}"
        time.sleep(0.5)


def ask(gp: GatewayProcess, user: str | None = None) -> httpx.Response:
    content = triage_user_message("I was charged twice")
    body = {"model": "stillhouse", "max_tokens": 8, "temperature": 0.0,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    if user is not None:
        body["user"] = user
    headers = {"authorization": "Bearer sk-integration"}
    return httpx.post(gp.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_a_restart_with_mlflow_down_serves_the_cached_champion_and_watches_again_after(
    tmp_path, mlflow_server, fault_engines, tiny_world, tiny_settings, group_processes
):
    mlflow = {"tracking_uri": mlflow_server.url, "registered_model": MODEL}
    registry = RegistryClient.from_settings(Settings(state_dir=tmp_path / "client", mlflow=mlflow))
    with registry.session("create a run") as client:
        run_id = client.create_run(registry.ensure_experiment("outage")).info.run_id
    v1 = registry.register_version(run_id, tiny_world.teacher_dir, {}, alias="champion")
    v2 = registry.register_version(run_id, tiny_world.teacher_dir, {}, alias="challenger")
    tracker = RunTracker(registry, "outage")
    record_challenger_rollback(registry, tracker, v2.version, actor="controller:calibration",
                               reason="calibration certified no threshold")  # fmt: skip

    teacher = fault_engines("teacher")["teacher"]
    engine = {**tiny_settings.engine.model_dump(mode="json", exclude={"api_key"}),
              "cpu_omp_threads_bind": "nobind"}  # fmt: skip
    gateway = {
        "engines": {"teacher": teacher.endpoint},
        "watch_interval_s": 1.0,
        "confidence": {"threshold": -50.0},  # the champion answers unless it breaks
        "shadow": {"fraction": 0.0},
    }
    top = {"mlflow": mlflow, "engine": engine}
    state = tmp_path / "gateway"
    running: list[GatewayProcess] = []
    try:
        first = GatewayProcess(state, gateway, top, ENGINE_START_S)
        running.append(first)
        assert ask(first).headers["x-stillhouse-served-by"] == "champion"
        assert admin(first)["registry"]["from_cache"] == {}
        with ThreadPoolExecutor(4) as pool:
            arms = list(pool.map(lambda i: ask(first, user=f"user-{i}"), range(USERS)))
        assert [a.status_code for a in arms] == [200] * USERS
        assert {a.headers["x-stillhouse-arm"] for a in arms} == {"champion"}
        engines = admin(first)["engines"]
        assert not engines["challenger"]["active"] and engines["challenger"]["pid"] is None
        assert f"challenger v{v2.version} was rolled back: not served" in first.output()
        assert first.interrupt() == 0

        mlflow_server.stop()
        started = time.monotonic()
        second = GatewayProcess(state, gateway, top, ENGINE_START_S)
        running.append(second)
        start_s = time.monotonic() - started
        answers = [ask(second) for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5
        assert {a.headers["x-stillhouse-served-by"] for a in answers} == {"champion"}
        assert teacher.stats()["requests"] == 0
        down = until(second, lambda s: s["last_poll"]["at"] is not None, "a first poll")
        assert down["engines"]["champion"]["model"] == v1.uri
        cached = down["registry"]["from_cache"][CHAMPION]
        assert cached["answer"] == v1.uri and "cannot reach MLflow" in cached["error"]
        assert "cannot reach MLflow" in (down["last_poll"]["error"] or "")
        assert "MLflow is unreachable" in second.output()

        mlflow_server.start()  # the same port and store
        back = until(
            second,
            lambda s: s["last_poll"]["error"] is None and not s["registry"]["from_cache"],
            "watching again",
        )
        assert back["engines"]["champion"]["model"] == v1.uri
        assert ask(second).status_code == 200
        print(
            f"rolled-back challenger: {USERS}/{USERS} users on the champion; restart with "
            f"MLflow down: healthy in {start_s:.0f} s, 5/5 answered by the champion"
        )
        assert second.interrupt() == 0
    finally:
        for gp in running:
            if gp.proc.poll() is None:  # a failed assertion: Ctrl-C first, so it stops its vLLM
                with contextlib.suppress(Exception):
                    gp.interrupt()
            gp.kill()
            assert group_processes(gp.proc.pid) == []
