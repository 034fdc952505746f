"""The LLM judge against real vLLM CPU servers on the tiny demo world's teacher:

    .venv/bin/pytest tests/integration/test_judge_vllm.py

With structured output on, every single-answer and pairwise verdict parses; a rerun with the
cache asks nothing; and vLLM 0.32 accepts `judge_engine_args`'s server flag and then writes
whitespace-free JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from stillhouse.demo.build import sample_judge_items, sample_pairwise_items
from stillhouse.eval.judge import JudgeConfig, judge_engine_args, run_judgments
from stillhouse.eval.judge_templates import (
    SINGLE_SCHEMA,
    DemoJudgeTemplate,
    RubricJudgeTemplate,
    parse_single,
)

pytestmark = pytest.mark.slow

DEMO = DemoJudgeTemplate()
N_TICKETS = 6


def _cases(world) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The shortest test tickets, so a pairwise prompt and its verdict fit the test engine's
    256-token context; candidates as the demo's evaluation makes them (right and wrong)."""
    tickets = sorted(world.split("test"), key=lambda t: len(t.text))[:N_TICKETS]
    seed = int(world.manifest["settings"]["seed"])
    single = [(i.ticket.text, i.candidate) for i in sample_judge_items(tickets, seed)]
    pairs = [(p.ticket.text, p.answer_a, p.answer_b) for p in sample_pairwise_items(tickets, seed)]
    return single, pairs


def test_demo_judge_parses_every_verdict_and_a_rerun_is_free(
    teacher_engine, tiny_world, tmp_path: Path
) -> None:
    single, pairs = _cases(tiny_world)
    config = JudgeConfig(
        base_url=teacher_engine.base_url, model="teacher", max_tokens=96, concurrency=4,
        cache_path=tmp_path / "judge.db",
    )  # fmt: skip
    assert config.structured_output
    first = run_judgments(config, DEMO, single, pairs)
    failed = [r.error for r in first.single + first.pairwise if r.status != "ok"]
    assert failed == []
    assert all(r.score in (1, 2, 3, 4, 5) and isinstance(r.reason, str) for r in first.single)
    assert all(r.outcome in ("a", "b", "tie") for r in first.pairwise)
    assert all(r.first in ("a", "b", "tie") and r.second in ("a", "b", "tie")
               for r in first.pairwise)  # fmt: skip
    # Two identical candidates are a tie without a call; every other pair is asked twice.
    verdicts = len(single) + 2 * sum(a != b for _, a, b in pairs)
    stats = first.stats
    assert (stats.ok, stats.unparseable, stats.errors) == (len(single) + len(pairs), 0, 0)
    assert stats.calls == verdicts + stats.parse_retries
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0

    again = run_judgments(config, DEMO, single, pairs)
    assert again.stats.calls == 0 and again.stats.cache_hits == verdicts
    assert [(r.key, r.score, r.reason) for r in again.single] == [
        (r.key, r.score, r.reason) for r in first.single
    ]
    assert [(r.key, r.outcome, r.first, r.second) for r in again.pairwise] == [
        (r.key, r.outcome, r.first, r.second) for r in first.pairwise
    ]


def test_compact_json_server_flag_is_accepted_and_applied(
    tiny_world, tiny_settings, group_processes
) -> None:
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    args = judge_engine_args(RubricJudgeTemplate())
    assert args  # a generic judge gets the flag
    engine = VllmEngine(
        EngineSpec(tiny_world.teacher_dir, "judge", extra_args=args),
        tiny_settings.engine,
        tiny_settings.logs_dir,
    )
    engine.start()
    pgid = engine.pid
    try:
        engine.wait_ready()
        single, _ = _cases(tiny_world)
        client = OpenAI(base_url=engine.base_url, api_key="unused", timeout=120, max_retries=0)
        schema = {"name": "judge_single", "schema": SINGLE_SCHEMA, "strict": True}
        texts = []
        for question, answer in single[:3]:
            response = client.chat.completions.create(
                model="judge", messages=DEMO.single_messages(question, answer),  # type: ignore[arg-type]
                max_completion_tokens=96, temperature=0.0,
                response_format={"type": "json_schema", "json_schema": schema},
            )  # fmt: skip
            texts.append(response.choices[0].message.content or "")
        client.close()
        for text in texts:
            verdict = parse_single(text)
            assert verdict is not None, text
            # no whitespace outside the reason string: the model spaced it in training
            assert text.startswith(f'{{"score":{verdict.score},"reason":'), text
            assert text.endswith('"}'), text
            assert json.loads(text)["reason"] == verdict.reason
    finally:
        engine.stop()
    assert pgid is not None
    assert group_processes(pgid) == [], "vLLM processes survived stop()"
