"""Case 11's shutdown half: stopping `stillhouse serve` (SIGTERM) or `stillhouse up` (Ctrl-C)
while a real vLLM server is still starting leaves no process behind, checked in the process
table: every process group the gateway noted (`<state_dir>/engines/`) and every process whose
command line names the config is gone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from stillhouse.serving.engines.vllm import free_port

pytestmark = pytest.mark.slow

SPAWN_S = 120.0  # until the gateway has spawned its vLLM server (imports, on a loaded machine)
EXIT_S = 90.0  # the stop: vLLM's grace period and the gateway's own


def _config(tmp_path: Path, teacher_url: str, model_dir: Path, engine: dict) -> Path:
    config = tmp_path / "stillhouse.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "demo": {"enabled": False},
        "engine": engine,
        "gateway": {"engines": {
            "teacher": {"base_url": teacher_url, "served_name": "teacher"},
            "champion": {"model": str(model_dir), "served_name": "champion"},
        }, "watch_interval_s": 0},
    }))  # fmt: skip
    return config


def _noted_groups(state: Path, until: float) -> list[int]:
    """The vLLM process groups the gateway noted, once there is one."""
    notes = state / "engines"
    while time.monotonic() < until:
        found = [json.loads(p.read_text())["pgid"] for p in notes.glob("*.json")]
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no vLLM server was started within {SPAWN_S} s")


def _left(config: Path, groups: list[int], group_processes) -> list[str]:
    left = [
        f"group {g}: {[p.pid for p in group_processes(g)]}" for g in groups if group_processes(g)
    ]
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if str(config) in (proc.info["cmdline"] or []) and proc.info["status"] != "zombie":
                left.append(f"pid {proc.info['pid']}: {' '.join(proc.info['cmdline'])}")
    return left


@pytest.mark.parametrize("command", ["serve", "up"])
def test_stopping_during_engine_start_up_leaves_no_process(
    tmp_path, command, fault_engines, tiny_world, tiny_settings, group_processes
):
    teacher = fault_engines("teacher")["teacher"]
    engine = tiny_settings.engine.model_dump(mode="json", exclude={"api_key"})
    config = _config(tmp_path, teacher.endpoint["base_url"], tiny_world.teacher_dir, engine)
    argv = [sys.executable, "-m", "stillhouse", "--config", str(config), command]
    argv += ["--port", str(free_port())] + (["--no-schedule"] if command == "up" else [])
    env = {**os.environ, "STILLHOUSE_API_KEYS": "sk-k", "STILLHOUSE_ADMIN_KEY": "sk-a"}
    log = (tmp_path / f"{command}.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    groups: list[int] = []
    try:
        groups = _noted_groups(tmp_path / "state", time.monotonic() + SPAWN_S)
        assert all(group_processes(g) for g in groups), "the vLLM server is starting"
        # serve: what `up`, `kill` or Kubernetes send; up: what a terminal's Ctrl-C sends.
        proc.send_signal(signal.SIGTERM if command == "serve" else signal.SIGINT)
        code = proc.wait(EXIT_S)
        assert code == (128 + signal.SIGTERM if command == "serve" else 0), code
        assert _left(config, groups, group_processes) == []
        assert "Traceback" not in (tmp_path / f"{command}.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for g in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGKILL)
        proc.wait(30)
        log.close()
