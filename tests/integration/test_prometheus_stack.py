"""Real Prometheus scraping the real stack: a `stillhouse serve` gateway in front of vLLM CPU
engines, a `stillhouse controller`, and the batch jobs' gauges. Traffic is driven through the
gateway, the evaluation jobs run on the traffic it logged, and then EVERY query of EVERY panel of
the shipped Grafana dashboard must return data — no panel silently empty because of a wrong
metric or label name. The rules Prometheus loads are the shipped ones, and must evaluate.

Two vLLM servers: the session's tiny teacher, and a perturbed copy of it that answers as both
champion and challenger; the gateway's HTTP service discovery still hands Prometheus one target
per role, so every `model_role` has series.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from dashboard_queries import load_dashboard, panel_queries, substitute
from fake_judge import FakeJudge, serve
from fake_vllm import LoopThread
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from safetensors.torch import load_file, save_file

from stillhouse.cli import evaluation
from stillhouse.cli.local_prometheus import dashboards_dir, prepare_local_prometheus
from stillhouse.common.config import Settings, load_settings
from stillhouse.common.prompts import triage_user_message
from stillhouse.rollout.controller.core import ControllerState, Phase, Promote, RollBack
from stillhouse.rollout.controller.store import ControllerStore
from stillhouse.rollout.distill.metrics import write_redistill_metrics
from stillhouse.serving.engines.vllm import VllmEngine, free_port, stop_group

pytestmark = pytest.mark.slow

KEY = "sk-prom-test"
ADMIN = "sk-prom-admin"
START_S = 90.0
DATA_S = 120.0  # how long every panel may take to show data once the traffic is in
TICKETS = [
    "I was charged twice for my order",
    "The app crashes when I open settings",
    "How do I reset my password?",
    "My package never arrived, tracking is stuck",
    "Please cancel my subscription before renewal",
    "Login keeps failing with an error code",
]
GATES = {"gate.status": 1.0, "gate.not_worse.status": 1.0, "gate.win_or_tie.status": 1.0,
         "gate.divergence.status": 1.0, "gate.fallback.status": 1.0,
         "gate.latency.status": 0.0, "gate.srm.status": 1.0}  # fmt: skip


def _wait(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready within {timeout_s:.0f} s")


@dataclass
class Stack:
    settings: Settings
    gateway_url: str
    prometheus_url: str
    logs: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr},
                          timeout=30)  # fmt: skip
        body = reply.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]


def _seed_history(settings: Settings) -> None:
    """What a week of operation leaves behind before this stack starts: a re-distillation that
    succeeded, and a rollout that rolled one challenger back and promoted the next (the real
    writers, the real journal)."""
    now = time.time()
    write_redistill_metrics(settings.metrics_dir / "redistill.prom", now - 3600, now - 600, True)
    store = ControllerStore.open(settings.controller_dir)
    # share/mirror: what the controller re-asserts at its start; the gateway config's values,
    # so the A/B split (and the mirror) this test needs stay on.
    state = ControllerState(phase=Phase.PROMOTED, version=2, share=0.5, mirror=0.3,
                            decided=frozenset({1, 2}))  # fmt: skip
    store.commit(state, [RollBack(1, "gates failed", GATES, "ramp-1/4", now - 900),
                         Promote(2, "gates passed", GATES, "ramp-4/4", now - 300)],
                 now - 300)  # fmt: skip
    for row in store.pending():
        store.mark_done(row.id)


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip


def _traffic(url: str, n: int) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def worker(offset: int) -> None:
        for i in range(offset, n, 4):
            messages = [{"role": "user", "content": triage_user_message(TICKETS[i % 6])}]
            kw: dict[str, Any] = {
                "model": "stillhouse", "messages": messages, "max_tokens": 16,
                "temperature": 0.0, "user": f"user-{i}",
            }  # fmt: skip
            if i % 2:
                for _ in client.chat.completions.create(**kw, stream=True):
                    pass
            else:
                client.chat.completions.create(**kw)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _shadow_idle(gateway_url: str) -> bool:
    text = httpx.get(f"{gateway_url}/metrics", timeout=5).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return (
        values["stillhouse_shadow_queue_depth"] == 0
        and values["stillhouse_shadow_scored_total"] > 0
    )


@pytest.fixture(scope="module")
def student_engine(
    tiny_world, tiny_settings, tmp_path_factory, vllm_server
) -> Iterator[VllmEngine]:
    """A student that is not the teacher: the tiny teacher with its weights perturbed, so the
    shadow divergence has real spread (the drift detector is calibrated on it)."""
    student_dir = tmp_path_factory.mktemp("perturbed-student")
    shutil.copytree(tiny_world.teacher_dir, student_dir, dirs_exist_ok=True)
    weights = load_file(student_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    noisy = {
        name: (t + 0.05 * t.std() * torch.randn(t.shape, generator=generator)).contiguous()
        if t.is_floating_point() and t.numel() > 1 else t
        for name, t in weights.items()
    }  # fmt: skip
    save_file(noisy, student_dir / "model.safetensors", metadata={"format": "pt"})
    with vllm_server(student_dir, "student", tiny_settings) as engine:
        yield engine


@pytest.fixture(scope="module")
def stack(teacher_engine, student_engine, tmp_path_factory, group_processes) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("prom-stack")
    loop = LoopThread()
    judge_url = serve(loop, FakeJudge())
    gw_port, controller_port, prom_port = free_port(), free_port(), free_port()
    teacher = {"base_url": teacher_engine.base_url, "served_name": "teacher"}
    student = {"base_url": student_engine.base_url, "served_name": "student"}
    config_path = state / "stillhouse.yaml"
    config_path.write_text(yaml.safe_dump({
        "state_dir": str(state),
        "gateway": {
            "port": gw_port, "watch_interval_s": 0,
            "engines": {"teacher": teacher, "champion": student, "challenger": student},
            "ab": {"challenger_share": 0.5, "mirror_share": 0.3},
            "shadow": {"fraction": 1.0},
            # The tiny teacher is unsure of everything; students must answer, to be scored.
            "confidence": {"threshold": -50.0},
        },
        "evaluation": {"judge": {"base_url": judge_url, "sample_per_arm": 20},
                       "drift": {"reference_size": 20, "min_current": 10}},
        "rollout": {"controller": {"metrics_port": controller_port, "tick_s": 1.0,
                                   "gateway_url": f"http://127.0.0.1:{gw_port}"}},
    }))  # fmt: skip
    settings = load_settings(config_path, environ={})
    _seed_history(settings)
    env = {**os.environ, "STILLHOUSE_API_KEYS": KEY, "STILLHOUSE_ADMIN_KEY": ADMIN,
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("STILLHOUSE_CONFIG", None)
    base = [sys.executable, "-m", "stillhouse", "--config", str(config_path)]
    procs: list[subprocess.Popen] = []
    try:
        gateway = _start([*base, "serve"], state / "serve.log", env)
        procs.append(gateway)
        gw_url = f"http://127.0.0.1:{gw_port}"
        _wait(lambda: httpx.get(f"{gw_url}/readyz", timeout=2).status_code == 200, START_S,
              "the gateway", gateway)  # fmt: skip
        controller = _start([*base, "controller"], state / "controller.log", env)
        procs.append(controller)
        _wait(lambda: httpx.get(f"http://127.0.0.1:{controller_port}/metrics", timeout=2)
              .status_code == 200, START_S, "the controller's metrics", controller)  # fmt: skip
        argv = prepare_local_prometheus(
            state, gateway=f"127.0.0.1:{gw_port}", controller=f"127.0.0.1:{controller_port}",
            listen=f"127.0.0.1:{prom_port}",
        )  # fmt: skip
        assert argv is not None, "prometheus is missing: `make test` installs Debian's package"
        prom_config = state / "prometheus" / "prometheus.yml"
        rendered = yaml.safe_load(prom_config.read_text())
        # Scrape and evaluate every second, so rates have points within a test's minute.
        rendered["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        for job in rendered["scrape_configs"]:
            for sd in job.get("http_sd_configs", []):
                sd["refresh_interval"] = "1s"
        prom_config.write_text(yaml.safe_dump(rendered, sort_keys=False))
        prometheus = _start(argv, state / "prometheus.log", env)
        procs.append(prometheus)
        prom_url = f"http://127.0.0.1:{prom_port}"
        _wait(lambda: httpx.get(f"{prom_url}/-/ready", timeout=2).status_code == 200, START_S,
              "prometheus", prometheus)  # fmt: skip

        _traffic(gw_url, 120)
        console = Console(quiet=True)
        # The teacher scores every student answer off the hot path: drift needs those scores.
        _wait(lambda: _shadow_idle(gw_url), DATA_S, "the shadow queue draining", gateway)
        time.sleep(2)  # the last scoring calls in flight, and their group commit
        evaluation.run_judge(settings, console, sample=20)
        evaluation.run_ab(settings, console)
        drift = evaluation.run_drift(settings, console)
        # One student serves both arms here, so drift has one result: it must be a decision.
        assert drift and all(r.assessment is not None for r in drift), drift
        _traffic(gw_url, 24)  # a second burst, so every rate has two points after the jobs
        yield Stack(settings, gw_url, prom_url, state)
    finally:
        for proc in reversed(procs):  # prometheus, controller, then the gateway
            stop_group(proc, 30.0)
            assert group_processes(proc.pid) == [], f"{proc.args[:4]} left processes behind"
        loop.close()


def test_prometheus_scrapes_the_gateway_the_engines_by_role_and_the_controller(stack: Stack):
    def targets_up() -> bool:
        up = stack.query("up == 1")
        return {(s["metric"]["job"], s["metric"].get("model_role", "")) for s in up} >= {
            ("stillhouse-gateway", ""), ("stillhouse-rollout", ""),
            ("stillhouse-engines", "teacher"), ("stillhouse-engines", "champion"),
            ("stillhouse-engines", "challenger"),
        }  # fmt: skip

    _wait(targets_up, DATA_S, "every scrape target up")
    kv = stack.query('vllm:kv_cache_usage_perc{model_role="champion"}')
    assert kv and kv[0]["metric"]["job"] == "stillhouse-engines"


def test_every_dashboard_panel_query_returns_data(stack: Stack):
    dashboard = load_dashboard(dashboards_dir() / "grafana" / "stillhouse.json")
    queries = [(row, panel, ref, substitute(expr)) for row, panel, ref, expr
               in panel_queries(dashboard)]  # fmt: skip
    assert len(queries) >= 30, "the dashboard lost its panels"
    empty: list[str] = []
    deadline = time.monotonic() + DATA_S
    while True:
        empty = [f"{row} / {panel} [{ref}]: {expr}" for row, panel, ref, expr in queries
                 if not stack.query(expr)]  # fmt: skip
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, f"{len(empty)} of {len(queries)} panel queries return no data:\n" + (
        "\n".join(empty)
    )


def test_the_shipped_rules_load_and_evaluate_without_errors(stack: Stack):
    def evaluated() -> bool:
        groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()
        rules = [r for g in groups["data"]["groups"] for r in g["rules"]]
        return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

    _wait(evaluated, DATA_S, "every rule evaluated once")
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]
    rules = [r for g in groups["groups"] for r in g["rules"]]
    assert {r["type"] for r in rules} == {"recording", "alerting"}
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    # A healthy stack: nothing about engines or the gateway is firing.
    firing = {a["labels"]["alertname"] for a in
              httpx.get(f"{stack.prometheus_url}/api/v1/alerts", timeout=10).json()["data"]
              ["alerts"] if a["state"] == "firing"}  # fmt: skip
    assert not {name for name in firing if "Engine" in name or "Gateway" in name}, firing
