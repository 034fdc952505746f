"""Load with wrk: POST one fixed body with fixed headers over `clients` keep-alive connections
for a fixed time, and read exact p50/p99 latency and req/s from a Lua `done()` hook (wrk's
own `--latency` table rounds to two decimals of its display unit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class Load:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # wrk counts statuses above 399
    socket_errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def error_share(self) -> float:
        return (self.non_2xx + self.socket_errors) / max(self.requests, 1)


def find_wrk() -> str | None:
    return shutil.which("wrk")


def write_script(path: Path, body: dict[str, object], headers: dict[str, str]) -> Path:
    text = json.dumps(body)
    assert "]==]" not in text
    lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())
    path.write_text(SCRIPT.format(body=text, headers=lines))
    return path


def run(wrk: str, url: str, script: Path, clients: int, duration_s: float) -> Load:
    # One wrk thread: on two cores a second thread only takes CPU from the server under test.
    argv = [
        wrk,
        "-t1",
        f"-c{clients}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 60, env=dict(os.environ)
    )
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            n, dur_us, p50, p99, status, sock = (int(x) for x in line.split()[1:])
            return Load(n, dur_us / 1e6, p50 / 1e3, p99 / 1e3, status, sock)
    raise RuntimeError(f"wrk gave no result (rc {out.returncode}): {out.stderr.strip()[-200:]}")
