"""A real `stillhouse serve` process on loopback, for the tests that need the whole gateway:
started with a config file, waited on with a bounded timeout, always stopped (its process group
killed; the `start_gateway` fixture checks that nothing of it survives).

    gp = start_gateway(engines={...}, fallback={...})   # the `gateway:` settings
    gp.client().chat.completions.create(...)
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
import yaml
from openai import OpenAI

from stillhouse.serving.engines.vllm import free_port

KEY = "sk-integration"
ADMIN_KEY = "sk-admin"
STARTUP_S = 60


class GatewayProcess:
    def __init__(
        self,
        state: Path,
        gateway: dict[str, Any],
        top: dict[str, Any] | None = None,
        startup_s: float = STARTUP_S,
    ):
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"state_dir": str(state), "gateway": {**gateway, "port": self.port}}
        config.update(top or {})
        state.mkdir(parents=True, exist_ok=True)
        (state / "stillhouse.yaml").write_text(yaml.safe_dump(config))
        self.log = open(state / "serve.log", "w")  # noqa: SIM115
        env = {**os.environ, "STILLHOUSE_API_KEYS": KEY, "STILLHOUSE_ADMIN_KEY": ADMIN_KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stillhouse", "--config", str(state / "stillhouse.yaml"),
             "serve"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {(state / 'serve.log').read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.kill()
        raise AssertionError("the gateway did not become healthy in time")

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    @property
    def log_path(self) -> Path:
        return self.state / "traffic.db"

    def output(self) -> str:
        """What `stillhouse serve` printed and logged so far."""
        self.log.flush()
        return (self.state / "serve.log").read_text(errors="replace")

    def metric(self, line_start: str, default: float | None = None) -> float:
        """The value of the first /metrics sample whose line starts with `line_start`; a
        labelled counter not yet counted has no line: `default` then, if given."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise AssertionError(f"no metric line starts with {line_start!r}")


@pytest.fixture
def start_gateway(tmp_path, group_processes) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(
        top: dict[str, Any] | None = None, startup_s: float = STARTUP_S, **gateway: Any
    ) -> GatewayProcess:
        gp = GatewayProcess(tmp_path / f"gw{len(started)}", gateway, top, startup_s)
        started.append(gp)
        return gp

    yield start
    for gp in started:
        if gp.proc.poll() is None:
            assert gp.interrupt() == 0, "Ctrl-C must stop `stillhouse serve` cleanly"
        gp.kill()
        assert group_processes(gp.proc.pid) == []
