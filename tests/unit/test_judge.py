"""The LLM judge client against a fake OpenAI judge on loopback (tests/unit/fake_judge.py), and
its pure parts table-style: strict parsing, the order-swap rule, statuses, cache keys."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_judge import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    FakeJudge,
    Reply,
    demo_responder,
    position_biased,
    serve,
    shown_answers,
)
from fake_vllm import LoopThread, loop_thread

from stillhouse.common.errors import ConfigError
from stillhouse.common.prompts import judge_user_message, pairwise_user_message
from stillhouse.eval.judge import (
    Judge,
    JudgeConfig,
    JudgeError,
    combine_status,
    judge_engine_args,
    pairwise_outcome,
    run_judgments,
    status_action,
    swap_winner,
)
from stillhouse.eval.judge_cache import cache_key
from stillhouse.eval.judge_templates import (
    DEMO_PAIRWISE_SCHEMA,
    PAIRWISE_SCHEMA,
    SINGLE_SCHEMA,
    DemoJudgeTemplate,
    PairwiseVerdict,
    RubricJudgeTemplate,
    SingleVerdict,
    parse_pairwise,
    parse_single,
    ticket_from_logged_prompt,
    ticket_from_triage_message,
)

DEMO = DemoJudgeTemplate()
TICKET = "i was charged twice for order #123"
TRIAGE = f"triage this support ticket.\nticket: {TICKET}"
GOOD = "category: billing\npriority: high\nreply: GOOD"
BAD = "category: shipping\npriority: low\nreply: meh"


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    with loop_thread() as lt:  # every fake served on it is stopped when the module ends
        yield lt


def config(base_url: str, **kw: Any) -> JudgeConfig:
    defaults: dict[str, Any] = {"model": "judge", "timeout_s": 5.0, "retry_backoff_s": 0.0}
    return JudgeConfig(base_url=base_url, **(defaults | kw))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def grade_all(cfg: JudgeConfig, items: list[tuple[str, str]], template=DEMO, **kw: Any):
    async with Judge(cfg, template, **kw) as judge:
        return await judge.grade_many(items), judge.stats


async def compare_all(cfg: JudgeConfig, items: list[tuple[str, str, str]], template=DEMO):
    async with Judge(cfg, template) as judge:
        return await judge.compare_many(items), judge.stats


# ---- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"score": 5, "reason": "ok"}', SingleVerdict(5, "ok")),
        ('  {"score":1,"reason":""}\n', SingleVerdict(1, "")),
        ('{"score": 0, "reason": "x"}', None),  # out of range
        ('{"score": 6, "reason": "x"}', None),
        ('{"score": 4.0, "reason": "x"}', None),  # wrong type
        ('{"score": true, "reason": "x"}', None),
        ('{"score": "4", "reason": "x"}', None),
        ('{"score": 4, "reason": 3}', None),
        ('{"score": 4}', None),  # missing
        ('{"score": 4, "reason": "x", "extra": 1}', None),  # extra
        ('{"score": 1, "score": 5, "reason": "x"}', None),  # duplicate key
        ('[{"score": 4, "reason": "x"}]', None),
        ('{"score": 4, "reason": "x', None),  # truncated at max_tokens
        ('```json\n{"score": 4, "reason": "x"}\n```', None),
        ("", None),
        (None, None),
    ],
)
def test_parse_single_is_strict(text: str | None, expected: SingleVerdict | None) -> None:
    assert parse_single(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"winner": "a", "reason": "r"}', PairwiseVerdict("a", "r")),
        ('{"winner": "tie", "reason": ""}', PairwiseVerdict("tie", "")),
        ('{"winner": "A", "reason": "r"}', None),
        ('{"winner": "both", "reason": "r"}', None),
        ('{"winner": 1, "reason": "r"}', None),
        ('{"winner": "b"}', None),
        ('{"winner": "b", "reason": "r", "score": 3}', None),
        ("b", None),
    ],
)
def test_parse_pairwise_is_strict(text: str, expected: PairwiseVerdict | None) -> None:
    assert parse_pairwise(text) == expected


@pytest.mark.parametrize(
    ("first", "second_raw", "outcome"),
    [
        ("a", "b", "a"),  # a wins shown first and shown second
        ("b", "a", "b"),
        ("a", "a", "tie"),  # position bias: always the first shown
        ("b", "b", "tie"),
        ("a", "tie", "tie"),
        ("tie", "a", "tie"),
        ("tie", "tie", "tie"),
    ],
)
def test_pairwise_win_needs_both_orders(first: str, second_raw: str, outcome: str) -> None:
    assert pairwise_outcome(first, swap_winner(second_raw)) == outcome


@pytest.mark.parametrize(
    ("statuses", "combined"),
    [
        (("ok", "ok"), "ok"),
        (("ok", "unparseable"), "unparseable"),
        (("unparseable", "error"), "error"),
        (("error", "ok"), "error"),
    ],
)
def test_combine_status(statuses: tuple[Any, ...], combined: str) -> None:
    assert combine_status(*statuses) == combined


@pytest.mark.parametrize(
    ("code", "action"),
    [(401, "config"), (403, "config"), (404, "config"), (400, "fail"), (422, "fail"),
     (408, "retry"), (429, "retry"), (500, "retry"), (503, "retry")],
)  # fmt: skip
def test_status_action(code: int, action: str) -> None:
    assert status_action(code) == action


@pytest.mark.parametrize(
    "bad",
    [{"concurrency": 0}, {"timeout_s": 0}, {"max_parse_retries": -1}, {"max_tokens": 0},
     {"temperature": -0.1}, {"model": ""}, {"api_key_env": ""}],
)  # fmt: skip
def test_config_rejects_out_of_range(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        config("http://127.0.0.1:1/v1", **bad)


def test_cache_key_covers_model_template_mode_and_order() -> None:
    base = cache_key("judge", "demo-1", "pairwise", ("q", "x", "y"))
    assert base == cache_key("judge", "demo-1", "pairwise", ("q", "x", "y"))
    assert len({
        base,
        cache_key("other", "demo-1", "pairwise", ("q", "x", "y")),
        cache_key("judge", "demo-2", "pairwise", ("q", "x", "y")),
        cache_key("judge", "demo-1", "single", ("q", "x", "y")),
        cache_key("judge", "demo-1", "pairwise", ("q", "y", "x")),
    }) == 5  # fmt: skip


def test_template_versions_follow_the_formats() -> None:
    assert DEMO.version == DemoJudgeTemplate().version
    assert DEMO.version.startswith("demo-")
    rubric = RubricJudgeTemplate()
    assert rubric.version != DEMO.version
    assert RubricJudgeTemplate(rubric="5: perfect\n1: useless").version != rubric.version
    with pytest.raises(ValueError):
        RubricJudgeTemplate(rubric="  ")


def test_demo_template_speaks_the_demo_teachers_formats() -> None:
    assert DEMO.single_messages(TICKET, GOOD) == [
        {"role": "user", "content": judge_user_message(TICKET, GOOD)}
    ]
    assert DEMO.pairwise_messages(TICKET, GOOD, BAD) == [
        {"role": "user", "content": pairwise_user_message(TICKET, GOOD, BAD)}
    ]
    system, user = RubricJudgeTemplate(rubric="5: great").single_messages("q?", "ans")
    assert system["role"] == "system" and "5: great" in system["content"]
    assert "q?" in user["content"] and "ans" in user["content"]


@pytest.mark.parametrize(
    ("prompt", "ticket"),
    [
        (json.dumps([{"role": "user", "content": TRIAGE}]), TICKET),
        (json.dumps([{"role": "system", "content": "hi"}, {"role": "user", "content": TRIAGE}]),
         TICKET),
        (f"<|user|>\ntriage this support ticket.\nticket: {TICKET}<|end|>\n<|assistant|>\n",
         TICKET),
        (TRIAGE, TICKET),
        (json.dumps([{"role": "user", "content": "hello"}]), None),
        (json.dumps({"messages": []}), None),
        ("", None),
        (None, None),
    ],
)  # fmt: skip
def test_ticket_from_logged_prompt(prompt: str | None, ticket: str | None) -> None:
    assert ticket_from_logged_prompt(prompt) == ticket


def test_ticket_from_triage_message() -> None:
    assert ticket_from_triage_message(TRIAGE) == TICKET
    assert ticket_from_triage_message("grade this answer") is None


def test_judge_engine_args_spell_vllms_server_option() -> None:
    flag, value = judge_engine_args(RubricJudgeTemplate())
    assert flag == "--structured-outputs-config"
    assert json.loads(value) == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert judge_engine_args(DEMO) == ()  # the demo teacher learned spaced JSON


# ---- over HTTP ----------------------------------------------------------------------------


def test_request_carries_the_json_schema_and_counts_usage(loop: LoopThread) -> None:
    fake = FakeJudge()
    url = serve(loop, fake)
    results, stats = run(grade_all(config(url), [(TICKET, GOOD), (TICKET, BAD)]))
    assert [(r.status, r.score, r.reason) for r in results] == [
        ("ok", 5, "fine"),
        ("ok", 4, "fine"),
    ]
    body = fake.requests[0]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "judge_single", "schema": SINGLE_SCHEMA, "strict": True},
    }
    assert body["temperature"] == 0.0 and body["max_completion_tokens"] == 256
    assert stats.calls == 2 and stats.ok == 2 and stats.judgments == 2
    assert (stats.prompt_tokens, stats.completion_tokens) == (
        2 * PROMPT_TOKENS,
        2 * COMPLETION_TOKENS,
    )

    fake_off = FakeJudge()
    run(grade_all(config(serve(loop, fake_off), structured_output=False), [(TICKET, GOOD)]))
    assert "response_format" not in fake_off.requests[0]


def test_malformed_reply_is_retried_with_sampling_then_parsed(loop: LoopThread) -> None:
    replies = ['{"score": 9, "reason": "x"}', "   ", '{"score": 3, "reason": "meh"}']
    fake = FakeJudge(responder=lambda body, i: Reply(replies[i]))
    (result,), stats = run(
        grade_all(config(serve(loop, fake), max_parse_retries=2), [(TICKET, BAD)])
    )
    assert (result.status, result.score, result.attempts) == ("ok", 3, 3)
    assert [b["temperature"] for b in fake.requests] == [0.0, 0.7, 0.7]
    assert (stats.parse_retries, stats.unparseable, stats.calls) == (2, 0, 3)


def test_always_malformed_is_unparseable_and_counted(loop: LoopThread) -> None:
    fake = FakeJudge(responder=lambda body, i: Reply('{"score": 4, "reason": "x", "also": 1}'))
    cfg = config(serve(loop, fake), max_parse_retries=1)
    (result,), stats = run(grade_all(cfg, [(TICKET, BAD)]))
    assert (result.status, result.score, result.attempts) == ("unparseable", None, 2)
    assert "also" in (result.error or "")
    assert (stats.calls, stats.unparseable, stats.ok, stats.errors) == (2, 1, 0, 0)


def test_identical_answers_are_a_tie_without_asking(loop: LoopThread) -> None:
    fake = FakeJudge()
    results, stats = run(compare_all(config(serve(loop, fake)), [(TICKET, GOOD, GOOD)]))
    assert [(r.status, r.outcome, r.attempts) for r in results] == [("ok", "tie", 0)]
    assert fake.requests == [] and stats.calls == 0 and stats.ok == 1


def test_pairwise_asks_both_orders_and_needs_agreement(loop: LoopThread) -> None:
    fake = FakeJudge()
    items = [(TICKET, GOOD, BAD), (TICKET, BAD, GOOD), (TICKET, BAD, BAD)]
    results, stats = run(compare_all(config(serve(loop, fake)), items))
    assert [r.outcome for r in results] == ["a", "b", "tie"]
    assert [(r.first, r.second) for r in results] == [("a", "a"), ("b", "b"), ("tie", "tie")]
    assert stats.calls == 4 and stats.ok == 3  # the identical pair costs no call
    shown = {shown_answers(b) for b in fake.requests}
    assert {(GOOD, BAD), (BAD, GOOD)} <= shown  # the second order really is swapped
    schema = fake.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema == DEMO_PAIRWISE_SCHEMA  # the demo template: reasoning before the verdict
    assert list(schema["properties"]) == ["reason", "winner"]
    assert {**schema, "required": sorted(schema["required"])} == {
        **PAIRWISE_SCHEMA,
        "required": sorted(PAIRWISE_SCHEMA["required"]),
    }  # the same fields and rules, only the order differs

    biased = FakeJudge(responder=position_biased)
    (result,), _ = run(compare_all(config(serve(loop, biased)), [(TICKET, GOOD, BAD)]))
    assert (result.status, result.outcome, result.first, result.second) == ("ok", "tie", "a", "b")


def test_pairwise_with_one_order_unparseable_is_unparseable(loop: LoopThread) -> None:
    def one_side_broken(body: dict[str, Any], i: int) -> Reply:
        a, _ = shown_answers(body)
        return Reply("no idea") if a == BAD else demo_responder(body, i)

    fake = FakeJudge(responder=one_side_broken)
    cfg = config(serve(loop, fake), max_parse_retries=1)
    (result,), stats = run(compare_all(cfg, [(TICKET, GOOD, BAD)]))
    assert (result.status, result.outcome, result.first, result.second) == (
        "unparseable", None, "a", None,
    )  # fmt: skip
    assert "(b,a)" in (result.error or "")
    assert (stats.unparseable, stats.judgments, stats.calls) == (1, 1, 3)


def test_rerun_with_cache_makes_no_calls_and_gives_the_same_results(
    loop: LoopThread, tmp_path: Path
) -> None:
    fake = FakeJudge()
    cfg = config(serve(loop, fake), cache_path=tmp_path / "judge.db")
    single = [(TICKET, GOOD), (TICKET, BAD), ("another ticket", GOOD)]
    pairs = [(TICKET, GOOD, BAD), (TICKET, BAD, BAD + " too")]
    first = run_judgments(cfg, DEMO, single, pairs)
    calls = len(fake.requests)
    assert calls == 3 + 4 and first.stats.cache_hits == 0
    again = run_judgments(cfg, DEMO, single, pairs)
    assert len(fake.requests) == calls  # not one call
    assert again.stats.calls == 0 and again.stats.cache_hits == 3 + 4
    assert all(r.cached and r.attempts == 0 for r in again.single + again.pairwise)

    def plain(r: Any) -> tuple[Any, ...]:
        return (r.key, r.status, getattr(r, "score", None), getattr(r, "outcome", None),
                getattr(r, "reason", None), getattr(r, "first", None))  # fmt: skip

    assert [plain(r) for r in again.single + again.pairwise] == [
        plain(r) for r in first.single + first.pairwise
    ]
    # (b, a) shares (a, b)'s two cached orders
    swapped = run_judgments(cfg, DEMO, (), [(TICKET, BAD, GOOD)])
    assert swapped.stats.calls == 0 and swapped.pairwise[0].outcome == "b"


def test_cache_misses_for_another_model_or_template(loop: LoopThread, tmp_path: Path) -> None:
    fake = FakeJudge()
    url = serve(loop, fake)
    path = tmp_path / "judge.db"
    items = [(TICKET, GOOD)]
    assert run_judgments(config(url, cache_path=path), DEMO, items).stats.calls == 1
    assert (
        run_judgments(config(url, cache_path=path, model="judge-2"), DEMO, items).stats.calls == 1
    )
    rubric = RubricJudgeTemplate()
    assert run_judgments(config(url, cache_path=path), rubric, items).stats.calls == 1
    assert run_judgments(config(url, cache_path=path), rubric, items).stats.calls == 0


def test_unparseable_and_failed_items_are_not_cached(loop: LoopThread, tmp_path: Path) -> None:
    fake = FakeJudge(responder=lambda body, i: Reply("nope"))
    cfg = config(serve(loop, fake), cache_path=tmp_path / "judge.db", max_parse_retries=0)
    assert run_judgments(cfg, DEMO, [(TICKET, GOOD)]).single[0].status == "unparseable"
    assert run_judgments(cfg, DEMO, [(TICKET, GOOD)]).stats.calls == 1  # asked again


def test_concurrency_never_exceeds_the_bound(loop: LoopThread) -> None:
    fake = FakeJudge(delay_s=0.05)
    items = [(f"ticket {i}", GOOD) for i in range(12)]
    done: list[int] = []

    async def go() -> list[Any]:
        async with Judge(config(serve(loop, fake), concurrency=3), DEMO) as judge:
            return await judge.grade_many(items, on_done=lambda i, r: done.append(i))

    results = run(go())
    assert fake.peak == 3
    assert [r.key for r in results] == [
        cache_key("judge", DEMO.version, "single", it) for it in items
    ]
    assert sorted(done) == list(range(12))


def test_timeout_is_an_error_and_counted(loop: LoopThread) -> None:
    fake = FakeJudge(responder=lambda body, i: Reply(hang=True))
    cfg = config(serve(loop, fake), timeout_s=0.3, max_transport_retries=0)
    (result,), stats = run(grade_all(cfg, [(TICKET, GOOD)]))
    assert (result.status, result.score) == ("error", None)
    assert "timed out" in (result.error or "")
    assert (stats.errors, stats.timeouts, stats.unparseable, stats.ok) == (1, 1, 0, 0)


def test_5xx_is_retried_then_recorded_as_error(loop: LoopThread) -> None:
    flaky = FakeJudge(responder=lambda b, i: Reply(status=503) if i == 0 else demo_responder(b, i))
    (result,), stats = run(grade_all(config(serve(loop, flaky)), [(TICKET, GOOD)]))
    assert (result.status, stats.transport_retries, stats.calls) == ("ok", 1, 2)

    down = FakeJudge(responder=lambda b, i: Reply(status=500))
    cfg = config(serve(loop, down), max_transport_retries=2)
    (result,), stats = run(grade_all(cfg, [(TICKET, GOOD)]))
    assert (result.status, stats.calls, stats.errors) == ("error", 3, 1)
    assert "HTTP 500" in (result.error or "")

    rejected = FakeJudge(responder=lambda b, i: Reply(status=400))
    (result,), stats = run(grade_all(config(serve(loop, rejected)), [(TICKET, GOOD)]))
    assert (result.status, stats.calls) == ("error", 1)  # a 400 is not retried


def test_unreachable_endpoint_is_an_error_not_a_crash() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(f"http://127.0.0.1:{port}/v1", max_transport_retries=1)
    (result,), stats = run(grade_all(cfg, [(TICKET, GOOD)]))
    assert result.status == "error" and "connection" in (result.error or "")
    assert (stats.calls, stats.transport_retries, stats.errors) == (2, 1, 1)


def test_refused_key_raises_one_line_without_the_key(loop: LoopThread) -> None:
    fake = FakeJudge(api_key="sk-right-one")
    cfg = config(serve(loop, fake), api_key_env="JUDGE_KEY")
    items = [(f"ticket {i}", GOOD) for i in range(50)]
    with pytest.raises(JudgeError) as caught:
        run(grade_all(cfg, items, environ={"JUDGE_KEY": "sk-wrong-secret"}))
    message = str(caught.value)
    assert "\n" not in message and "401" in message and "$JUDGE_KEY" in message
    assert "sk-wrong-secret" not in message and "sk-right-one" not in message
    assert len(fake.requests) == 0
    # calls already in flight may be refused too; none is sent after the first refusal
    assert 1 <= fake.refused <= cfg.concurrency

    ok, _ = run(grade_all(cfg, items[:1], environ={"JUDGE_KEY": "sk-right-one"}))
    assert ok[0].status == "ok"


def test_unknown_model_and_missing_key_variable_raise(loop: LoopThread) -> None:
    fake = FakeJudge(model="judge")
    with pytest.raises(JudgeError, match="no model 'nope'"):
        run(grade_all(config(serve(loop, fake), model="nope"), [(TICKET, GOOD)]))
    with pytest.raises(JudgeError, match=r"\$MISSING_KEY is not set"):
        Judge(config(serve(loop, fake), api_key_env="MISSING_KEY"), DEMO, environ={})
