"""The fault suite's parts: fake engines in their own processes (fault_engine.py) that fail on
command, and real `stillhouse serve` processes in front of them (serve_process.py).

Every process started here is stopped after its test, and its process group checked empty.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from clients import FAST_FALLBACK
from serve_process import GatewayProcess

from stillhouse.serving.engines.vllm import free_port

HERE = Path(__file__).resolve().parent
READY_S = 20


class FaultEngine:
    """One fault_engine.py process: an OpenAI-compatible engine that fails on command."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"engine-{name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fault_engine.py"), "--port", str(self.port),
             "--name", name],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + READY_S
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"fault engine {name} did not start")
            time.sleep(0.1)

    @property
    def endpoint(self) -> dict[str, str]:
        """Its entry under gateway.engines."""
        return {"base_url": self.url + "/v1", "served_name": self.name}

    def fault(self, mode: str, **params: Any) -> None:
        """Fail this way from now on (resets the counts)."""
        httpx.post(self.url + "/fault", json={"mode": mode, **params}, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/fault", timeout=5).json()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def fault_engines(tmp_path, group_processes) -> Iterator[Callable[..., dict[str, FaultEngine]]]:
    """`fault_engines("teacher", "champion")`: one fault engine per role, stopped after."""
    started: list[FaultEngine] = []

    def start(*roles: str) -> dict[str, FaultEngine]:
        engines = {role: FaultEngine(role, tmp_path) for role in roles}
        started.extend(engines.values())
        return engines

    yield start
    for engine in started:
        engine.stop()
        assert group_processes(engine.proc.pid) == []


@pytest.fixture
def faulty_gateway(fault_engines, start_gateway):
    """`faulty_gateway(**gateway)`: a teacher and a champion fault engine, and `stillhouse serve`
    in front of them with FAST_FALLBACK (overridable per key)."""

    def start(
        fallback: dict[str, Any] | None = None, **gateway: Any
    ) -> tuple[GatewayProcess, dict[str, FaultEngine]]:
        engines = fault_engines("teacher", "champion")
        settings = {
            "engines": {role: e.endpoint for role, e in engines.items()},
            "fallback": {**FAST_FALLBACK, **(fallback or {})},
            "confidence": {"threshold": -5.0, "hold_tokens": 4},
            "shadow": {"fraction": 0.0},
            "watch_interval_s": 0,
            **gateway,
        }
        return start_gateway(top={"demo": {"enabled": False}}, **settings), engines

    return start
