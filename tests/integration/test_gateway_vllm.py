"""The gateway (`stillhouse serve`, a real process) in front of real vLLM CPU engines, driven
by the official `openai` client. The tiny demo teacher serves as the teacher and, as a second
engine, as the "student": same weights, so the shadow scores of the student's tokens must equal
the student's own log-probabilities, which pins their alignment token by token."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import APIStatusError
from serve_process import KEY

from stillhouse.common.prompts import triage_user_message
from stillhouse.common.traffic import TrafficLogReader
from stillhouse.serving.engines.vllm import VllmEngine

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": triage_user_message("I was charged twice for my order")}]


@pytest.fixture(scope="module")
def student_engine(tiny_world, tiny_settings, vllm_server) -> Iterator[VllmEngine]:
    with vllm_server(tiny_world.teacher_dir, "student", tiny_settings) as engine:
        yield engine


def engines(teacher: VllmEngine, student: VllmEngine) -> dict[str, Any]:
    return {
        "teacher": {"base_url": teacher.base_url, "served_name": "teacher"},
        "champion": {"base_url": student.base_url, "served_name": "student"},
    }


def test_openai_client_through_the_gateway_stream_and_not(teacher_engine, student_engine,
                                                          start_gateway):  # fmt: skip
    gw = start_gateway(engines=engines(teacher_engine, student_engine),
                       confidence={"threshold": -50.0})  # fmt: skip
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=24, temperature=0.0,
        logprobs=True, top_logprobs=2, user="alice",
    )  # fmt: skip
    assert raw.headers["x-stillhouse-served-by"] == "champion"
    out = raw.parse()
    assert out.model == "stillhouse" and out.choices[0].message.content.startswith("category:")
    assert all(len(t.top_logprobs) == 2 for t in out.choices[0].logprobs.content)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="stillhouse", messages=MSG, max_tokens=24, temperature=0.0, stream=True
        )
        if c.choices
    )
    assert streamed == out.choices[0].message.content
    text = client.completions.create(
        model="stillhouse", prompt="category:", max_tokens=4, temperature=0.0, stop=["\n"]
    )
    assert text.choices[0].text and "\n" not in text.choices[0].text
    with pytest.raises(APIStatusError) as err:
        client.chat.completions.create(model="stillhouse", messages=[], max_tokens=4)
    assert err.value.status_code == 400


def test_a_high_threshold_forces_the_teacher(teacher_engine, student_engine, start_gateway):
    gw = start_gateway(engines=engines(teacher_engine, student_engine),
                       confidence={"threshold": -0.0001})  # fmt: skip
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=24, temperature=0.0
    )
    assert raw.headers["x-stillhouse-served-by"] == "teacher"
    assert raw.headers["x-stillhouse-fallback"] == "low_confidence"
    with gw.client().chat.completions.with_streaming_response.create(
        model="stillhouse", messages=MSG, max_tokens=24, temperature=0.0, stream=True
    ) as resp:
        assert resp.headers["x-stillhouse-served-by"] == "teacher"
        streamed = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert streamed == raw.parse().choices[0].message.content


def test_shadow_scores_line_up_with_the_students_own_tokens(teacher_engine, student_engine,
                                                             start_gateway):  # fmt: skip
    gw = start_gateway(
        engines=engines(teacher_engine, student_engine),
        confidence={"threshold": -50.0},
        shadow={"fraction": 1.0, "top_k": 3},
    )
    client = gw.client()
    client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=24,
                                   temperature=0.0)  # fmt: skip
    for _ in client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=24,
                                            temperature=0.0, stream=True):  # fmt: skip
        pass
    deadline = time.monotonic() + 30
    shadow: list = []
    while time.monotonic() < deadline and len(shadow) < 2:
        time.sleep(0.3)
        with TrafficLogReader(gw.log_path) as reader:
            shadow = reader.shadow()
    assert len(shadow) == 2
    for record in shadow:
        assert len(record.token_ids) >= 5
        # Same weights on both engines: the teacher's log-prob of each student token is the
        # student's own; an off-by-one alignment would show as large differences.
        for s, t in zip(record.student_logprobs, record.teacher_logprobs, strict=True):
            assert abs(s - t) < 0.02, (record.student_logprobs, record.teacher_logprobs)
        assert set(record.student_top[0]) & set(record.teacher_top[0])


def test_gateway_kill9_leaves_a_clean_log_missing_at_most_the_last_flush(
    teacher_engine, student_engine, start_gateway
):
    gw = start_gateway(engines=engines(teacher_engine, student_engine),
                       traffic_log={"flush_interval_ms": 200})  # fmt: skip
    answered: list[tuple[str, float]] = []
    stop = threading.Event()

    def drive(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while not stop.is_set():
                rid = f"k{i}-{n}"
                n += 1
                headers = {"authorization": f"Bearer {KEY}", "x-request-id": rid}
                body = {"model": "stillhouse", "prompt": "category:", "max_tokens": 2}
                try:
                    r = http.post(gw.url + "/v1/completions", headers=headers, json=body)
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    answered.append((rid, time.monotonic()))

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Kill mid-traffic once enough answers are in (a loaded machine answers slower).
    deadline = time.monotonic() + 90
    while len(answered) < 40 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(gw.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    stop.set()
    for t in threads:
        t.join(30)
    gw.proc.wait(10)
    conn = sqlite3.connect(gw.log_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with TrafficLogReader(gw.log_path) as reader:
        logged = {r.request_id for r in reader.records()}  # every row parses in full
    missing = [(rid, t) for rid, t in answered if rid not in logged]
    assert len(answered) > 20
    # Only answers from the last flush interval (plus one commit's time) may be missing.
    assert all(killed_at - t < 0.2 + 0.3 for _, t in missing), missing


def test_strict_mode_survives_kill9_with_every_answered_record(teacher_engine, student_engine,
                                                                start_gateway):  # fmt: skip
    gw = start_gateway(engines=engines(teacher_engine, student_engine),
                       traffic_log={"sync": "strict", "flush_interval_ms": 5000})  # fmt: skip
    answered = []
    with httpx.Client(timeout=30) as http:
        for n in range(25):
            r = http.post(gw.url + "/v1/completions", headers={
                "authorization": f"Bearer {KEY}", "x-request-id": f"s-{n}"},
                json={"model": "stillhouse", "prompt": "category:", "max_tokens": 2})  # fmt: skip
            assert r.status_code == 200
            answered.append(f"s-{n}")
    os.killpg(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)
    with TrafficLogReader(gw.log_path) as reader:
        logged = {r.request_id for r in reader.records()}
    assert set(answered) <= logged


def test_student_killed_then_teacher_answers_then_503_when_all_are_down(
    teacher_engine, student_engine, start_gateway
):
    # Runs last in this module: it stops the module's student engine.
    gw = start_gateway(engines=engines(teacher_engine, student_engine),
                       confidence={"threshold": -50.0},
                       fallback={"breaker_failures": 2, "deadline_s": 20})  # fmt: skip
    client = gw.client()
    first = client.chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=8, temperature=0.0
    )
    assert first.headers["x-stillhouse-served-by"] == "champion"
    student_engine.stop()
    reasons = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="stillhouse", messages=MSG, max_tokens=8, temperature=0.0
        )
        assert raw.headers["x-stillhouse-served-by"] == "teacher"
        reasons.append(raw.headers["x-stillhouse-fallback"])
    assert reasons[0] == "connection" and reasons[-1] == "circuit_open"
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'stillhouse_gateway_circuit_state{engine="champion"} 2.0' in metrics
    dead = student_engine.base_url
    down = start_gateway(engines={"teacher": {"base_url": dead}, "champion": {"base_url": dead}},
                         fallback={"deadline_s": 5})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(APIStatusError) as err:
        down.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
    assert err.value.status_code == 503 and time.monotonic() - started < 6
    assert json.loads(err.value.response.text)["error"]["type"] == "service_unavailable"
