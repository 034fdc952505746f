"""Case 11, the gateway's process with a real vLLM champion:

- a `kill -9` of the gateway under `stillhouse up`, with clients sending requests: `up` restarts
  it, the restarted gateway re-adopts the vLLM server the dead one left (no second server, no
  cold start), and since `up` holds the listening socket, requests made meanwhile wait for the
  restarted gateway instead of being refused: only those in flight at the kill are lost;
- stopping `stillhouse serve` (SIGTERM) or `stillhouse up` (Ctrl-C) while the vLLM server is
  still starting leaves no process behind.

Both are checked in the process table: every process group the gateway noted
(`<state_dir>/engines/`) and every process whose command line names the config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from clients import ask

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


def _kill_all(proc: subprocess.Popen, groups: list[int]) -> None:
    """Whatever a failed test left: the command's process group and every vLLM group."""
    for pgid in [proc.pid, *groups]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    proc.wait(30)


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
        _kill_all(proc, groups)
        log.close()


CLIENTS = 2
READY_S = 300.0  # `up`, the gateway and a cold vLLM start on a loaded two-core machine


REFUSED = 0  # the connection was refused
BROKEN = -1  # the connection broke (the gateway died with the request in flight)


class Load:
    """Clients sending requests in a loop: (time sent, seconds taken, status or REFUSED/BROKEN).
    The timeout is longer than a gateway restart: a request made meanwhile may wait for it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                status = ask(self.url, False, timeout=120.0).status
            except httpx.ConnectError:
                status = REFUSED
                time.sleep(0.2)
            except httpx.HTTPError:
                status = BROKEN
            self.seen.append((sent, time.monotonic() - sent, status))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)


def _gateway_child(up: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(up.pid).children():
        with contextlib.suppress(psutil.Error):
            if "serve" in child.cmdline():
                return child
    return None


def _until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return ask(url, False, timeout=20.0).status == 200
    return False


def test_a_killed_gateway_under_up_re_adopts_its_vllm_server(
    tmp_path, fault_engines, tiny_world, tiny_settings, group_processes
):
    teacher = fault_engines("teacher")["teacher"]
    engine = tiny_settings.engine.model_dump(mode="json", exclude={"api_key"})
    engine["cpu_omp_threads_bind"] = "nobind"  # see test_engine_restart_vllm.py
    config = _config(tmp_path, teacher.endpoint["base_url"], tiny_world.teacher_dir, engine)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "stillhouse", "--config", str(config), "up", "--no-schedule"]
    env = {**os.environ, "STILLHOUSE_API_KEYS": "sk-integration", "STILLHOUSE_ADMIN_KEY": "sk-a"}
    log_path = tmp_path / "up.log"
    log = log_path.open("w")
    up = subprocess.Popen(
        [*argv, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    groups: list[int] = []
    try:
        _until(lambda: _answers(url), READY_S, "the gateway to answer")
        groups = _noted_groups(tmp_path / "state", time.monotonic() + 5)
        assert len(groups) == 1, groups
        with Load(url) as load:
            time.sleep(3.0)
            gateway = _gateway_child(up)
            assert gateway is not None
            killed = time.monotonic()
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(30)
            restarted = _until(
                lambda: (g := _gateway_child(up)) and g.pid != gateway.pid and g,
                60.0,
                "`up` to restart the gateway",
            )
            _until(
                lambda: any(t > killed and s == 200 for t, _, s in load.seen[:]),
                READY_S,
                "a request made after the kill to succeed",
            )
            time.sleep(3.0)
        after = [(t - killed, took, s) for t, took, s in load.seen if t + took > killed]
        back = min(t + took for t, took, s in after if s == 200)
        failed = [s for _, _, s in after if s != 200]
        print(
            f"answered again {back:.1f} s after the kill; {len(after)} requests in flight or made "
            f"since, {len(failed)} failed ({failed}); the longest waited "
            f"{max(took for _, took, _ in after):.1f} s"
        )
        # `up` holds the port: nothing is refused, and only what the dead gateway had in flight
        # (one request per client at most) is lost.
        assert REFUSED not in failed
        assert len(failed) <= CLIENTS and set(failed) <= {BROKEN}
        assert all(s == 200 for t, _, s in after if t > back)  # and once back, nothing fails
        # The same vLLM server, noted as the restarted gateway's: re-adopted, not restarted.
        notes = [json.loads(p.read_text()) for p in (tmp_path / "state" / "engines").glob("*.json")]
        assert [n["pgid"] for n in notes] == groups
        assert notes[0]["owner"] == restarted.pid
        assert group_processes(groups[0])
        gateway_log = tmp_path / "state" / "logs" / "up-gateway.log"
        assert "re-adopted the vLLM server" in gateway_log.read_text()
        up.send_signal(signal.SIGINT)
        assert up.wait(EXIT_S) == 0
        assert _left(config, groups, group_processes) == []
    finally:
        _kill_all(up, groups)
        log.close()
