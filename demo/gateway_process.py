"""`stillhouse serve` as a child process of the demo, in front of engines the demo started.

The demo starts the engines itself (so the teacher can also judge once traffic stops) and runs
the gateway exactly as a user would, as its own process: configured through the same
`STILLHOUSE_*` environment overrides, listening on loopback, writing the same traffic log.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from stillhouse.common.errors import StillhouseError
from stillhouse.serving.engines.vllm import free_port, read_log_tail, start_group, stop_group
from stillhouse.serving.serve import ResolvedEngine


class GatewayStartError(StillhouseError):
    """The demo's gateway did not come up."""


def engine_overrides(engines: Mapping[str, ResolvedEngine], urls: Mapping[str, str]) -> dict:
    """`STILLHOUSE_GATEWAY__ENGINES__<ROLE>` for engines already running at `urls`."""
    return {
        f"STILLHOUSE_GATEWAY__ENGINES__{role.upper()}": json.dumps(
            {
                "base_url": urls[role],
                "served_name": engines[role].served_name,
                "model_uri": engines[role].ref,
            }
        )
        for role in engines
    }


class GatewayProcess:
    def __init__(self, env: Mapping[str, str], log_path: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self._env = {**os.environ, **env}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "stillhouse", "serve", "--port", str(self.port)]
        self._proc = start_group(cmd, self.log_path, self._env)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                time.sleep(0.3)
        self.stop()
        raise GatewayStartError(
            f"the gateway did not become ready within {timeout_s:.0f} s; last lines of "
            f"{self.log_path}:\n{read_log_tail(self.log_path)}"
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (the gateway finishes in-flight requests and flushes its traffic log), then
        SIGKILL for whatever is left of its process group."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, grace_s)
