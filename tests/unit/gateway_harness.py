"""A gateway in front of fake engines on one background loop, for the unit tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fake_vllm import Behaviour, LoopThread, engine_app
from openai import OpenAI

from stillhouse.common.config import Settings
from stillhouse.common.traffic import TrafficLogReader
from stillhouse.serving.gateway.app import GATEWAY, build_app
from stillhouse.serving.gateway.parts import EngineEndpoint, Gateway

CLIENT_KEY = "sk-client-test"
ADMIN_KEY = "sk-admin-test"


@dataclass
class Harness:
    url: str
    settings: Settings
    engines: dict[str, Behaviour]
    gateway: Gateway
    loop: LoopThread
    runner_index: dict[str, int] = field(default_factory=dict)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def client(self, key: str = CLIENT_KEY, **kw: Any) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def post(self, path: str, body: Any, key: str | None = CLIENT_KEY, **kw: Any):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        headers.update(kw.pop("headers", {}))
        content = body if isinstance(body, bytes) else None
        return self.http.post(
            self.url + path, json=None if content else body, content=content,
            headers=headers, timeout=30, **kw,
        )  # fmt: skip

    def stop_engine(self, role: str) -> None:
        self.loop.stop_runner(self.runner_index[role])

    def records(self, n: int, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        while True:
            path = self.settings.traffic_log_path
            if path.exists():
                with TrafficLogReader(path) as reader:
                    got = reader.records()
                if len(got) >= n or time.monotonic() > deadline:
                    return got
            elif time.monotonic() > deadline:
                return []
            time.sleep(0.05)

    def record(self, request_id: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records(1, timeout) if r.request_id == request_id]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no traffic record for {request_id}")

    def shadow(self, n: int, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        while True:
            with TrafficLogReader(self.settings.traffic_log_path) as reader:
                got = reader.shadow()
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def settings_for(state: Path, **gateway: Any) -> Settings:
    base: dict[str, Any] = {
        "fallback": {"attempt_timeout_s": 2.0, "deadline_s": 5.0, "retries": 1,
                     "breaker_failures": 3, "breaker_cooldown_s": 0.5},
        "confidence": {"threshold": -0.5, "hold_tokens": 4},
        "shadow": {"fraction": 0.0},
        "traffic_log": {"flush_interval_ms": 20},
    }  # fmt: skip
    for key, value in gateway.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings.model_validate({"state_dir": str(state), "gateway": base})


@contextmanager
def gateway_harness(
    state: Path, roles: tuple[str, ...] = ("teacher", "champion"), **gateway: Any
) -> Iterator[Harness]:
    settings = settings_for(state, **gateway)
    env = {"STILLHOUSE_API_KEYS": f"{CLIENT_KEY},sk-other", "STILLHOUSE_ADMIN_KEY": ADMIN_KEY}
    lt = LoopThread()
    try:
        behaviours = {role: Behaviour() for role in roles}
        endpoints: dict[str, EngineEndpoint] = {}
        index: dict[str, int] = {}
        for role in roles:
            url = lt.serve(engine_app(behaviours[role], role))
            index[role] = len(lt.runners) - 1
            endpoints[role] = EngineEndpoint(url + "/v1", role, f"ref-{role}")
        app = build_app(settings, endpoints, env)
        url = lt.serve(app)
        harness = Harness(url, settings, behaviours, app[GATEWAY], lt, index)
        with harness.http:
            yield harness
    finally:
        lt.close()
