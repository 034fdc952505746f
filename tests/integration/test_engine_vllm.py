"""A real vLLM CPU server on the tiny demo teacher: completions with logprobs, prompt_logprobs,
readiness failures that quote the log, and a stop that leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from stillhouse.common.errors import EngineStartError
from stillhouse.demo.build import sample_judge_items
from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

pytestmark = pytest.mark.slow


def _client(engine: VllmEngine) -> OpenAI:
    return OpenAI(base_url=engine.base_url, api_key="unused", max_retries=0, timeout=60)


def _triage_prompt(tiny_world) -> str:
    from transformers import AutoTokenizer

    from stillhouse.demo.examples import triage_messages

    tok = AutoTokenizer.from_pretrained(str(tiny_world.teacher_dir))
    ticket = tiny_world.split("test")[0]
    rendered = tok.apply_chat_template(
        triage_messages(ticket), add_generation_prompt=True, tokenize=False
    )
    return rendered + "category:"


def test_models_endpoint_lists_the_served_name(teacher_engine):
    names = [m.id for m in _client(teacher_engine).models.list().data]
    assert names == ["teacher"]


def test_completion_returns_token_logprobs_with_top_alternatives(teacher_engine, tiny_world):
    response = _client(teacher_engine).completions.create(
        model="teacher",
        prompt=_triage_prompt(tiny_world),
        max_tokens=6,
        temperature=0.0,
        logprobs=3,
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.token_logprobs) == response.usage.completion_tokens > 0
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)


def test_chat_completion_returns_logprobs(teacher_engine, tiny_world):
    ticket = tiny_world.split("test")[1]
    response = _client(teacher_engine).chat.completions.create(
        model="teacher",
        messages=[
            {"role": "user", "content": f"triage this support ticket.\nticket: {ticket.text}"}
        ],
        max_tokens=8,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens > 0
    assert all(len(item.top_logprobs) == 2 for item in content)


def test_prompt_logprobs_score_every_prompt_token_after_the_first(teacher_engine, tiny_world):
    prompt = _triage_prompt(tiny_world) + " billing"
    response = _client(teacher_engine).completions.create(
        model="teacher", prompt=prompt, max_tokens=1, temperature=0.0,
        extra_body={"prompt_logprobs": 1},
    )  # fmt: skip
    scored = response.choices[0].model_extra["prompt_logprobs"]
    assert scored[0] is None  # nothing precedes the first token
    assert len(scored) == response.usage.prompt_tokens
    for position in scored[1:]:
        assert position, "every later prompt token carries its own log-probability"
        assert all(entry["logprob"] <= 0.0 for entry in position.values())


def test_served_teacher_can_be_scored_against_ground_truth(teacher_engine, tiny_world):
    from transformers import AutoTokenizer

    from stillhouse.demo.evaluate import evaluate_served_model

    tok = AutoTokenizer.from_pretrained(str(tiny_world.teacher_dir))
    tickets = tiny_world.split("test")[:12]
    items = sample_judge_items(tickets, seed=0)
    client = _client(teacher_engine)
    triage, judge, _ = evaluate_served_model(client, "teacher", tok, tickets, items)
    assert triage.n == 12 and judge.n == 12
    # even the one-epoch tiny teacher has learned the answer format
    assert triage.parsed > 0.5


def test_a_broken_model_directory_fails_fast_with_the_log_tail(
    tmp_path, tiny_settings, group_processes
):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    engine = VllmEngine(EngineSpec(tmp_path, "broken"), tiny_settings.engine, tmp_path / "logs")
    started = time.monotonic()
    engine.start()
    pgid = engine.pid
    with pytest.raises(EngineStartError) as info:
        engine.wait_ready(timeout_s=300)
    assert time.monotonic() - started < 300
    message = str(info.value)
    assert "exited with code" in message
    assert "no-such-architecture" in message  # the log tail is quoted
    assert group_processes(pgid) == []


def test_a_missed_readiness_deadline_stops_the_server(
    tiny_world, tiny_settings, tmp_path, group_processes
):
    engine = VllmEngine(
        EngineSpec(tiny_world.teacher_dir, "slow"), tiny_settings.engine, tmp_path / "logs"
    )
    engine.start()
    pgid = engine.pid
    with pytest.raises(EngineStartError, match="not ready within 2 s"):
        engine.wait_ready(timeout_s=2)
    assert group_processes(pgid) == []


def test_engines_serve_runs_until_ctrl_c_and_leaves_nothing_behind(
    tiny_world, tiny_settings, group_processes
):
    env = {
        **os.environ,
        "STILLHOUSE_STATE_DIR": str(tiny_settings.state_dir),
        "STILLHOUSE_ENGINE__ENFORCE_EAGER": "true",
        "STILLHOUSE_ENGINE__MAX_MODEL_LEN": "256",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stillhouse",
            "engines",
            "serve",
            "--model",
            str(tiny_world.teacher_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 420
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "serving" in line and "Ctrl-C" in line:
                break
        assert any("serving" in s for s in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        # stop() gives vLLM 15 s of grace, then SIGKILL; 120 s leaves room for a loaded CI box.
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert group_processes(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
