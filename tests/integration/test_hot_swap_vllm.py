"""Hot swap with real vLLM CPU engines: `stillhouse serve` follows `models:/<name>@champion` in
a local MLflow registry; under continuous load (streamed and not) the alias moves to another
version, the gateway starts a server for it, switches, drains and stops the old server, and no
client request fails. Two "student" versions are the tiny teacher registered twice; the second
carries a calibrated threshold that the gateway must take up with it."""

from __future__ import annotations

import contextlib
import os
import signal
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
import yaml

from stillhouse.common.calibration_tags import CALIBRATION_TAG_PREFIX as P
from stillhouse.common.config import Settings
from stillhouse.common.prompts import triage_user_message
from stillhouse.common.registry import RegistryClient
from stillhouse.common.traffic import TrafficLogReader
from stillhouse.serving.engines.vllm import free_port, read_log_tail

pytestmark = pytest.mark.slow

KEY, ADMIN_KEY = "sk-swap", "sk-swap-admin"
MODEL = "hot-swap-student"
START_S = 480.0  # one vLLM start on a loaded 2-core machine, with margin
SWAP_S = 480.0
CALIBRATED = {P + "threshold": "-60", P + "certified": "true", P + "signal": "mean_logprob",
              P + "hold_tokens": "8"}  # fmt: skip
PAUSE_S = 0.5  # per client between requests: about 8 requests/s from four clients
# vLLM's default CPU binding ("auto") pins every engine's worker to core 0 of this two-core
# machine; there the busy old champion's worker (it polls for work: ~90 % of a core even at
# 8 requests/s) starved the new server's freshly spawned worker completely (9 ms of CPU in 6
# minutes, kernel 6.18), so the swap never happened. Unbound, the new worker runs on core 1 and
# is ready in about a minute under the same load.
ENGINE_BIND = "nobind"
PROMPTS = ["I was charged twice for my order", "the app crashes when I log in",
           "how do I change my shipping address"]  # fmt: skip


@dataclass
class Sent:
    request_id: str
    stream: bool
    sent: float  # wall clock
    ok: bool
    detail: str = ""


class Gateway:
    """`stillhouse serve` as a subprocess in its own process group."""

    def __init__(self, state: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = state / "stillhouse.yaml"
        config["gateway"]["port"] = self.port
        path.write_text(yaml.safe_dump(config))
        self.log_path = state / "serve.log"
        self.code: int | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("STILLHOUSE_")}
        env.update(STILLHOUSE_API_KEYS=KEY, STILLHOUSE_ADMIN_KEY=ADMIN_KEY)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stillhouse", "--config", str(path), "serve"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{read_log_tail(self.log_path, 60)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        raise AssertionError(f"not ready in time:\n{read_log_tail(self.log_path, 60)}")

    def engines(self) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        resp = httpx.get(self.url + "/admin/engines", headers=headers, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()["engines"]

    def stop(self) -> int | None:
        """Ctrl-C (once), then SIGKILL for whatever of its group is left; the exit code of
        the Ctrl-C, None if it had to be killed."""
        if self.code is None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.code = self.proc.wait(120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        return self.code


@pytest.fixture
def registry(tmp_path, tiny_world, tiny_settings) -> tuple[Settings, RegistryClient]:
    settings = Settings(
        state_dir=tmp_path / "state",
        engine=tiny_settings.engine,
        mlflow={"registered_model": MODEL},
    )
    client = RegistryClient.from_settings(settings)
    experiment = client.ensure_experiment("hot-swap")
    for version, alias, tags in ((1, "champion", {}), (2, None, CALIBRATED)):
        with client.session("create a run") as mlflow:
            run_id = mlflow.create_run(experiment).info.run_id
        info = client.register_version(run_id, tiny_world.teacher_dir, tags, alias=alias)
        assert info.version == version
    return settings, client


@pytest.fixture
def gateway(registry, teacher_engine, group_processes) -> Iterator[Gateway]:
    settings, _ = registry
    config = {
        "state_dir": str(settings.state_dir),
        "engine": {
            **settings.engine.model_dump(mode="json", exclude={"api_key"}),
            "cpu_omp_threads_bind": ENGINE_BIND,
        },
        "mlflow": {"registered_model": MODEL},
        "gateway": {
            "watch_interval_s": 1.0,
            "engines": {
                "teacher": {"base_url": teacher_engine.base_url, "served_name": "teacher"},
                "champion": {"model": f"models:/{MODEL}@champion"},
            },
            "confidence": {"threshold": -50.0},  # the student answers unless it breaks
            "shadow": {"fraction": 0.0},
        },
    }
    gw = Gateway(settings.state_dir, config)
    try:
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"Ctrl-C must stop serve cleanly:\n{read_log_tail(gw.log_path, 40)}"
        assert group_processes(gw.proc.pid) == []


def drive(url: str, worker: int, stream: bool, stop: threading.Event, out: list[Sent]) -> None:
    """Requests until `stop`; every one that is not a complete answer is a failure."""
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=90) as http:
        n = 0
        while not stop.is_set():
            rid = f"w{worker}-{n}"
            n += 1
            content = triage_user_message(PROMPTS[n % len(PROMPTS)])
            body = {"model": "stillhouse", "messages": [{"role": "user", "content": content}],
                    "max_tokens": 8, "temperature": 0.0, "stream": stream}  # fmt: skip
            sent = time.time()
            try:
                ok, detail = _one(http, url, {**headers, "x-request-id": rid}, body, stream)
            except httpx.HTTPError as exc:
                ok, detail = False, repr(exc)
            out.append(Sent(rid, stream, sent, ok, detail))
            stop.wait(PAUSE_S)


def _one(http: httpx.Client, url: str, headers: dict, body: dict, stream: bool) -> tuple[bool, str]:
    if not stream:
        resp = http.post(url + "/v1/chat/completions", json=body, headers=headers)
        if resp.status_code != 200:
            return False, f"{resp.status_code} {resp.text[:200]}"
        return bool(resp.json()["choices"][0]["message"]["content"]), ""
    with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            return False, f"{resp.status_code} {resp.read()[:200]!r}"
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    if any('"error"' in line for line in lines):
        return False, f"error event: {lines[-2:]}"
    if lines[-1:] != ["data: [DONE]"]:
        return False, "the stream ended without [DONE]"
    return True, ""


def test_moving_the_champion_alias_under_load_fails_no_request(registry, gateway, group_processes):
    settings, client = registry
    gateway.wait_ready(START_S)
    before = gateway.engines()["champion"]
    v1, v2 = f"models:/{MODEL}/1", f"models:/{MODEL}/2"
    assert before["model"] == v1 and before["follows"] == f"models:/{MODEL}@champion"
    assert before["threshold"] == -50.0 and "no calibrated threshold" in before["threshold_source"]
    old_pid = before["pid"]
    assert old_pid and group_processes(old_pid)

    sent: list[Sent] = []
    stop = threading.Event()
    workers = [
        threading.Thread(target=drive, args=(gateway.url, i, i % 2 == 1, stop, sent))
        for i in range(4)
    ]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 60
        while len(sent) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(sent) >= 20, "no load"
        moved = time.time()
        client.set_alias("champion", 2)
        deadline = time.monotonic() + SWAP_S
        while True:
            champion = gateway.engines()["champion"]
            swap = champion["last_swap"]
            if swap is not None and swap["to"] == v2 and champion["swapping"] is None:
                break
            assert time.monotonic() < deadline, f"no swap:\n{read_log_tail(gateway.log_path)}"
            assert gateway.proc.poll() is None, read_log_tail(gateway.log_path, 60)
            time.sleep(1)
        done = swap["at"]
        after = len(sent)
        deadline = time.monotonic() + 60
        while len(sent) < after + 20 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(120)

    failures = [s for s in sent if not s.ok]
    during = [s for s in sent if moved <= s.sent <= done]
    print(
        f"\nhot swap: {len(sent)} requests ({sum(s.stream for s in sent)} streamed), "
        f"{len(during)} sent while the swap ran, {len(failures)} failed; swap "
        f"{swap['seconds']:.1f} s from the poll that saw the move to the old server stopped; "
        f"alias move to done {done - moved:.1f} s"
    )
    assert failures == [], failures[:5]
    assert swap["from"] == v1 and swap["outcome"] == "ok" and swap["stopped_pid"] == old_pid
    assert len(during) >= 10 and any(s.stream for s in during)
    assert group_processes(old_pid) == [], "the old engine's processes survived the swap"
    assert champion["model"] == v2 and champion["pid"] not in (None, old_pid)
    assert champion["threshold"] == -60.0
    assert champion["threshold_source"] == f"calibrated for {v2}"
    new_pid = champion["pid"]

    by_id = {s.request_id: s for s in sent}
    deadline = time.monotonic() + 10
    while True:
        with TrafficLogReader(settings.traffic_log_path) as reader:
            records = {r.request_id: r for r in reader.records() if r.request_id in by_id}
        if len(records) == len(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(records) == len(sent)
    early = [r for rid, r in records.items() if by_id[rid].sent < moved]
    late = [r for rid, r in records.items() if by_id[rid].sent > done]
    assert early and all(r.student_model == v1 for r in early)
    assert len(late) >= 10 and all(r.student_model == v2 for r in late)
    assert all(r.status == 200 for r in records.values())

    assert gateway.stop() == 0
    assert group_processes(new_pid) == [], "serve left its engine running"
