"""The gateway against in-process fake engines: who answers, fallback, streaming, shadow."""

from __future__ import annotations

import time

import pytest
from gateway_harness import gateway_harness
from openai import APIStatusError

MSG = [{"role": "user", "content": "I was charged twice"}]


def served(raw) -> tuple[str, str, str]:
    h = raw.headers
    return h["x-stillhouse-arm"], h["x-stillhouse-served-by"], h["x-stillhouse-fallback"]


@pytest.fixture
def gw(tmp_path):
    with gateway_harness(tmp_path) as harness:
        yield harness


def test_a_confident_student_answers_and_the_body_keeps_openai_shape(gw):
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=8
    )
    assert served(raw) == ("champion", "champion", "none")
    body = raw.parse()
    assert body.model == "stillhouse"
    assert body.choices[0].message.content.startswith("w11 ")
    # The gateway asked the student for logprobs; the client did not, so it gets none.
    assert body.choices[0].logprobs is None
    assert gw.engines["champion"].requests[0]["logprobs"] is True
    assert gw.engines["teacher"].requests == []
    (record,) = gw.records(1)
    assert (record.arm, record.served_by, record.status) == ("champion", "champion", 200)
    assert record.confidence == pytest.approx(-0.01)
    assert record.completion_tokens == 8 and record.answer.startswith("w11 ")


def test_logprobs_are_trimmed_to_what_the_client_asked(gw):
    out = gw.client().chat.completions.create(
        model="stillhouse", messages=MSG, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert gw.engines["champion"].requests[0]["top_logprobs"] == 5  # the confidence's top-k


def test_low_confidence_falls_back_to_the_teacher(gw):
    gw.engines["champion"].logprob = -2.0
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=8
    )
    assert served(raw) == ("champion", "teacher", "low_confidence")
    assert raw.parse().model == "stillhouse"
    (record,) = gw.records(1)
    assert record.fallback_reason == "low_confidence"
    assert record.confidence == pytest.approx(-2.0)
    assert record.student_answer.startswith("w11 ")
    # the student's tokens are paid for too: the cost report counts them
    assert record.student_completion_tokens == 8  # max_tokens cut its answer at 8


def test_confidence_reads_only_the_first_hold_tokens(gw):
    # Unsure tokens after the first `hold_tokens` (4) do not change the decision, so a stream
    # and a plain request get the same one.
    gw.engines["champion"].answer_ids = [11, 12, 13, 14, 15, 16, 1]
    gw.engines["champion"].logprob = -0.1
    raw = gw.client().completions.with_raw_response.create(
        model="stillhouse", prompt="hello", max_tokens=7
    )
    assert served(raw)[1] == "champion"


@pytest.mark.parametrize("mode,reason", [("error500", "upstream_5xx"), ("hang", "timeout")])
def test_a_failing_student_falls_back_within_the_deadline(gw, mode, reason):
    gw.engines["champion"].mode = mode
    started = time.monotonic()
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=8
    )
    assert served(raw) == ("champion", "teacher", reason)
    assert time.monotonic() - started < gw.settings.gateway.fallback.deadline_s


def test_a_teacher_slower_than_the_attempt_timeout_still_answers_within_the_deadline(gw):
    # Nothing falls back from the teacher, so its attempt has the rest of the deadline
    # (attempt 2 s + 8 tokens at 20/s = 2.4 s here; the deadline is 5 s).
    gw.engines["champion"].mode = "error500"
    gw.engines["teacher"].delay_s = 3.0
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=8
    )
    assert served(raw) == ("champion", "teacher", "upstream_5xx")
    assert gw.gateway.router.engines["teacher"].breaker.state == "closed"


def test_a_dead_student_falls_back_and_its_circuit_opens(gw):
    gw.stop_engine("champion")
    client = gw.client()
    reasons = []
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="stillhouse", messages=MSG, max_tokens=4
        )
        reasons.append(served(raw)[2])
    # A refused connection is retried once: two requests make the three failures that open the
    # breaker; then no more calls go out.
    assert reasons[:2] == ["connection", "connection"]
    assert reasons[-1] == "circuit_open"
    assert gw.gateway.router.engines["champion"].breaker.state == "open"


def test_the_breaker_probes_again_after_its_cool_down(gw):
    student = gw.engines["champion"]
    student.mode = "error500"
    client = gw.client()
    for _ in range(3):  # a 5xx is not retried on the engine that gave it: one failure each
        client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
    assert len(student.requests) == 3
    assert gw.gateway.router.engines["champion"].breaker.state == "open"
    calls = len(student.requests)
    client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
    assert len(student.requests) == calls  # open: not called
    student.mode = "ok"
    time.sleep(0.6)  # cool-down 0.5 s
    raw = client.chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=4
    )
    assert served(raw)[1] == "champion"
    assert gw.gateway.router.engines["champion"].breaker.state == "closed"


def test_both_engines_down_is_a_503_in_openai_shape_within_the_deadline(gw):
    gw.engines["champion"].mode = "hang"
    gw.engines["teacher"].mode = "error500"
    started = time.monotonic()
    with pytest.raises(APIStatusError) as err:
        gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
    assert time.monotonic() - started < gw.settings.gateway.fallback.deadline_s + 1
    assert err.value.status_code == 503
    error = err.value.body
    assert error["type"] == "service_unavailable" and "no engine could answer" in error["message"]
    (record,) = gw.records(1)
    assert (record.status, record.served_by) == (503, "none")


def test_a_students_4xx_is_retried_on_the_teacher_and_not_held_against_it(gw):
    gw.engines["champion"].mode = "reject400"
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=4
    )
    assert served(raw) == ("champion", "teacher", "engine_rejected")
    assert gw.gateway.router.engines["champion"].breaker.consecutive_failures == 0
    metrics = gw.http.get(gw.url + "/metrics").text
    assert 'stillhouse_gateway_engine_rejections_total{engine="champion",status="400"} 1.0' in (
        metrics
    )


def test_a_4xx_from_both_engines_is_the_clients_mistake_and_passes_through(gw):
    gw.engines["champion"].mode = "reject400"
    gw.engines["teacher"].mode = "reject400"
    with pytest.raises(APIStatusError) as err:
        gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
    assert err.value.status_code == 400
    assert "maximum context length" in err.value.body["message"]
    for role in ("champion", "teacher"):
        assert gw.gateway.router.engines[role].breaker.consecutive_failures == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_side_4xx_counts_against_the_engine_and_falls_back(gw, stream):
    # A wrong served name (the engine's 404) fails every request: the engine's fault.
    gw.gateway.router.engines["champion"].served_name = "not-what-it-serves"
    raw = gw.client().chat.completions.with_raw_response.create(
        model="stillhouse", messages=MSG, max_tokens=4, stream=stream
    )
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert served(raw) == ("champion", "teacher", "engine_4xx")
    assert gw.gateway.router.engines["champion"].breaker.consecutive_failures == 1


def test_streaming_serves_the_student_in_one_piece(gw):
    chunks = list(
        gw.client().chat.completions.create(
            model="stillhouse", messages=MSG, max_tokens=8, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"w{t} " for t in range(11, 19))
    assert all(c.model == "stillhouse" for c in chunks)
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # not asked for: the usage chunk is dropped
    (record,) = gw.records(1)
    assert record.stream and record.served_by == "champion" and record.ttft_s is not None
    assert record.completion_tokens == 8


def test_streaming_fallback_never_mixes_two_answers(gw):
    gw.engines["champion"].logprob = -3.0
    gw.engines["teacher"].answer_ids = [51, 52, 53, 1]
    with gw.client().chat.completions.with_streaming_response.create(
        model="stillhouse", messages=MSG, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    ) as resp:  # fmt: skip
        assert resp.headers["x-stillhouse-served-by"] == "teacher"
        assert resp.headers["x-stillhouse-fallback"] == "low_confidence"
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w51 w52 w53 "
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    (record,) = gw.records(1)
    assert record.student_completion_tokens == 4  # the held tokens (hold_tokens = 4)


def test_a_stream_that_breaks_after_the_decision_ends_with_an_error_event(gw):
    gw.engines["champion"].mode = "break_stream"
    gw.engines["champion"].answer_ids = list(range(11, 31))
    resp = gw.post(
        "/v1/chat/completions",
        {"model": "stillhouse", "messages": MSG, "max_tokens": 20, "stream": True},
    )
    assert resp.status_code == 200
    events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert '"error"' in events[-1] and "[DONE]" not in resp.text
    (record,) = gw.records(1)
    assert record.status == 502 and "broke off" in record.error


def test_completions_stream_with_logprobs(gw):
    chunks = list(
        gw.client().completions.create(
            model="stillhouse", prompt="hi", max_tokens=5, stream=True, logprobs=1
        )
    )
    assert [c.choices[0].text for c in chunks] == ["w11 ", "w12 ", "w13 ", "w14 ", "w15 "]
    assert all(len(c.choices[0].logprobs.top_logprobs[0]) == 1 for c in chunks)


def test_shadow_scoring_stores_both_sides_for_the_students_tokens(tmp_path):
    with gateway_harness(tmp_path, shadow={"fraction": 1.0, "top_k": 2}) as gw:
        gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=6)
        (shadow,) = gw.shadow(1)
        assert shadow.token_ids == (11, 12, 13, 14, 15, 16)
        assert shadow.student_logprobs == pytest.approx((-0.01,) * 6)
        assert shadow.teacher_logprobs == pytest.approx((-0.5,) * 6)  # the fake teacher's
        assert (
            shadow.student_top[0] == {11: -0.01, 12: pytest.approx(-1.01), 13: -2.01}
            or len(shadow.student_top[0]) == 5
        )
        assert shadow.teacher_top is not None and len(shadow.teacher_top[0]) == 2
        scoring = gw.engines["teacher"].requests[-1]
        assert scoring["prompt_logprobs"] == 2 and scoring["max_tokens"] == 1


def test_a_full_shadow_queue_drops_and_counts_without_delaying_answers(tmp_path):
    shadow = {"fraction": 1.0, "queue_size": 1, "concurrency": 1}
    with gateway_harness(tmp_path, shadow=shadow) as gw:
        gw.engines["teacher"].delay_s = 1.0
        client = gw.client()
        started = time.monotonic()
        for _ in range(4):
            client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        assert time.monotonic() - started < 1.0
        registry = gw.gateway.metrics.registry
        assert registry.get_sample_value("stillhouse_shadow_dropped_total") >= 2
