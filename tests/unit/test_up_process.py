"""`stillhouse up --with-prometheus` as a user runs it: the gateway, the controller, the
scheduler and Prometheus come up as child processes, Prometheus scrapes the gateway and the
controller, a killed child is restarted, and Ctrl-C stops every one of them.

The engines are the fake vLLM servers over HTTP (base_url engines: `serve` starts no vLLM), so
this checks the supervision, not inference; the real engines are covered by the gateway and
hot-swap integration tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml
from fake_vllm import Behaviour, engine_app, loop_thread

from stillhouse.serving.engines.vllm import free_port

START_S = 120.0


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _children_of(config: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            if str(config) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def test_up_starts_supervises_and_stops_gateway_controller_and_schedule(tmp_path: Path):
    with loop_thread() as lt:
        teacher = lt.serve(engine_app(Behaviour(), "teacher"))
        student = lt.serve(engine_app(Behaviour(), "student"))
        port, metrics_port, prom_port = free_port(), free_port(), free_port()
        config = tmp_path / "stillhouse.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"),
            "gateway": {"engines": {
                "teacher": {"base_url": f"{teacher}/v1", "served_name": "teacher"},
                "champion": {"base_url": f"{student}/v1", "served_name": "student"},
            }, "watch_interval_s": 0},
            "rollout": {"controller": {"tick_s": 0.5, "metrics_port": metrics_port}},
        }))  # fmt: skip
        env = {**os.environ, "STILLHOUSE_ADMIN_KEY": "sk-admin-up"}
        env.pop("STILLHOUSE_CONFIG", None)
        up = subprocess.Popen(
            [sys.executable, "-m", "stillhouse", "--config", str(config), "up", "--port",
             str(port), "--with-prometheus", "--prometheus-port", str(prom_port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            text=True,
        )  # fmt: skip
        logs = tmp_path / "state" / "logs"
        try:
            _wait(lambda: _up_ready(port), START_S, "the gateway")
            _wait(lambda: "first start" in _read(logs / "up-controller.log"), START_S,
                  "the controller's first tick")  # fmt: skip
            names = {p.info["cmdline"][p.info["cmdline"].index(str(config)) + 1]
                     for p in _children_of(config)}  # fmt: skip
            assert {"serve", "controller", "schedule", "up"} <= names
            reply = httpx.get(f"http://127.0.0.1:{port}/admin/ab",
                              headers={"authorization": "Bearer sk-admin-up"})  # fmt: skip
            assert reply.status_code == 200  # the key `up` was given reaches the gateway
            # --with-prometheus: Prometheus scrapes the gateway and the controller's /metrics
            # (the shipped config: a 15 s scrape interval).
            _wait(lambda: _scraped(prom_port, 'up{job="stillhouse-gateway"} == 1'), 90,
                  "Prometheus scraping the gateway")  # fmt: skip
            _wait(lambda: _scraped(prom_port, 'stillhouse_rollout_phase{phase="idle"} == 1'),
                  90, "Prometheus scraping the controller")  # fmt: skip

            controller = next(p for p in _children_of(config) if "controller" in p.cmdline())
            os.killpg(controller.pid, signal.SIGKILL)

            def restarted() -> bool:
                return any("controller" in p.cmdline() and p.pid != controller.pid
                           for p in _children_of(config))  # fmt: skip

            _wait(restarted, 60, "the controller's restart")
            _wait(lambda: _read(logs / "up-controller.log").count("resuming") >= 1, 60,
                  "the restarted controller resuming its state")  # fmt: skip

            up.send_signal(signal.SIGINT)
            out, _ = up.communicate(timeout=90)
            assert up.returncode == 0, out
            assert re.search(r"controller exited with code -9; restarting", out), out
            assert "stopping gateway" in out
            assert _children_of(config) == []
            assert _prometheus_of(prom_port) == []
        finally:
            if up.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(up.pid, signal.SIGKILL)
                up.wait(30)
            for proc in _children_of(config) + _prometheus_of(prom_port):
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def _up_ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _scraped(prom_port: int, expr: str) -> bool:
    try:
        reply = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": expr},
                          timeout=2)  # fmt: skip
        return reply.status_code == 200 and bool(reply.json()["data"]["result"])
    except httpx.HTTPError:
        return False


def _prometheus_of(prom_port: int) -> list[psutil.Process]:
    flag = f"--web.listen-address=127.0.0.1:{prom_port}"
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if flag in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found
