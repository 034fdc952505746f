"""The streaming path: hold the student's first tokens, decide, then stream one answer.

    held = student events until `hold_tokens` tokens (or the answer ends)
    low confidence / failure → drop the student stream, stream the teacher's answer from its start
    otherwise               → send the held events, then pipe the rest of the student's stream

Nothing reaches the client before the decision, so it never sees parts of two answers; the
price is that its first token waits for N student tokens (see serving/gateway.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.confidence import TokenLogprobs
from stillhouse.serving.gateway.core import PATHS, Gateway, StreamSink, Trace, sse
from stillhouse.serving.gateway.errors import UpstreamUnavailable, error_body
from stillhouse.serving.gateway.requests import ParsedRequest, upstream_body
from stillhouse.serving.gateway.upstream import Engine, UpstreamFailure, sse_events

Events = AsyncIterator[dict[str, Any] | None]


@dataclass
class StudentStream:
    """What the gateway collects from the student's stream while it passes through."""

    held: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[TokenLogprobs] = field(default_factory=list)
    saw_logprobs: bool = False
    ended: bool = False
    prompt_ids: list[int] | None = None
    answer_ids: list[int] = field(default_factory=list)
    top: list[dict[int, float]] | None = field(default_factory=list)

    def take(self, event: dict[str, Any], endpoint: str) -> None:
        tokens = responses.token_logprobs(event, endpoint)
        if tokens is not None:
            self.saw_logprobs = True
            self.tokens.extend(tokens)
        prompt_ids, answer_ids = responses.token_ids(event)
        if prompt_ids:
            self.prompt_ids = prompt_ids
        if answer_ids:
            self.answer_ids.extend(answer_ids)
        if self.top is not None and tokens:
            top = responses.top_by_token_id(event, endpoint)
            self.top = None if top is None else self.top + top


async def _hold(
    gw: Gateway, student: Engine, events: Events, collected: StudentStream, trace: Trace, ep: str
) -> None:
    """Read the student's stream until `hold_tokens` tokens are in or it ends."""
    hold = gw.settings.confidence.hold_tokens
    timeout = gw.attempt_timeout(trace)  # a passed deadline is no fault of the engine
    started = gw.clock()
    try:
        async with asyncio.timeout(timeout):
            while len(collected.tokens) < hold:
                event = await anext(events, None)
                if event is None:
                    collected.ended = True
                    return
                if "error" in event:
                    raise UpstreamFailure("upstream_5xx", f"{student.role} stream error")
                collected.held.append(event)
                collected.take(event, ep)
    except TimeoutError:
        gw.failed(student)
        raise UpstreamFailure("timeout", f"{student.role} held no answer in time") from None
    except UpstreamFailure:
        gw.failed(student)
        raise
    finally:
        trace.upstream_s += gw.clock() - started


async def _open(gw: Gateway, engine: Engine, trace: Trace, body: dict, path: str, retry: bool):
    return await gw.call(
        engine, trace, lambda t: gw.client.open_stream(engine, path, body, t), retry_timeouts=retry
    )


async def _pipe(
    gw: Gateway,
    request: ParsedRequest,
    trace: Trace,
    sink: StreamSink,
    events: Events,
    collected: StudentStream | None,
    added_logprobs: bool,
) -> None:
    """Shape and send events until the engine's `[DONE]`; the caller sends its own `[DONE]`."""
    async for event in events:
        if event is None:
            return
        if "error" in event:
            raise UpstreamFailure("upstream_5xx", "the engine reported an error mid-stream")
        if collected is not None:
            collected.take(event, request.endpoint)
        await _forward(gw, request, trace, sink, event, added_logprobs)
    raise UpstreamFailure("connection", "the stream ended without [DONE]")


async def _forward(
    gw: Gateway,
    request: ParsedRequest,
    trace: Trace,
    sink: StreamSink,
    event: dict[str, Any],
    added_logprobs: bool,
) -> None:
    """Record one event and send it to the client in the shape it asked for."""
    if not _account(trace, event, request):
        return
    model = gw.settings.model_name
    responses.shape_for_client(event, request, model, added_logprobs=added_logprobs)
    if trace.ttft_s is None:
        trace.ttft_s = gw.clock() - trace.started
    await sink.send(sse(event))


def _account(trace: Trace, event: dict[str, Any], request: ParsedRequest) -> bool:
    """Record the event's text and usage; False for a usage-only chunk the client did not ask
    for (the gateway asks for usage always, for the traffic log)."""
    trace.answer += responses.answer_text(event, request.endpoint)
    prompt_tokens, completion_tokens = responses.usage_counts(event)
    if completion_tokens is not None:
        trace.prompt_tokens, trace.completion_tokens = prompt_tokens, completion_tokens
    return bool(event.get("choices")) or request.include_usage


async def stream_answer(
    gw: Gateway, request: ParsedRequest, trace: Trace, sink: StreamSink
) -> bool:
    """Stream one answer into `sink`, all but the final `[DONE]`. Returns True when the answer
    is complete, False when it broke off after the response had started (an error event was
    sent). Raises a `GatewayError` when nothing was sent yet (the route answers in JSON)."""
    ep, path = request.endpoint, PATHS[request.endpoint]
    student = gw.engines[trace.arm]
    trace.student_model = student.ref
    shadow = gw.wants_shadow()
    collected = StudentStream()
    resp: aiohttp.ClientResponse | None = None
    try:
        try:
            body = gw.student_body(request, student, shadow)
            resp = await _open(gw, student, trace, body, path, retry=False)
            student.in_flight += 1  # its stream is open: in flight until closed (hot swap)
            events = sse_events(resp)
            await _hold(gw, student, events, collected, trace, ep)
            tokens = collected.tokens if collected.saw_logprobs else None
            if gw.low_confidence(tokens, trace, student.threshold):
                trace.student_answer = "".join(responses.answer_text(e, ep) for e in collected.held)
                # The held tokens; the stream is cut here, so that is what the student spent
                # (give or take the few it generated before it saw the cancel).
                trace.student_completion_tokens = len(collected.tokens)
        except UpstreamFailure as failure:
            trace.fallback_reason = failure.reason
        if trace.fallback_reason is None:
            trace.served_by = trace.arm
            await sink.start(200, gw.route_headers(trace))
            sent_ok = await _send_student(gw, request, trace, sink, events, collected, student)
            if sent_ok and shadow:
                gw.offer_shadow(
                    trace, collected.prompt_ids, collected.answer_ids, collected.tokens,
                    collected.top,
                )  # fmt: skip
            return sent_ok
    finally:
        if resp is not None:
            student.in_flight -= 1
            resp.close()
    gw.metrics.fallbacks.labels(trace.fallback_reason).inc()
    return await _stream_teacher(gw, request, trace, sink, path)


async def _send_student(
    gw: Gateway,
    request: ParsedRequest,
    trace: Trace,
    sink: StreamSink,
    events: Events,
    collected: StudentStream,
    student: Engine,
) -> bool:
    for event in collected.held:
        await _forward(gw, request, trace, sink, event, added_logprobs=True)
    if collected.ended:
        return True
    try:
        await _pipe(gw, request, trace, sink, events, collected, added_logprobs=True)
    except UpstreamFailure as failure:
        gw.failed(student)  # the engine it picked: routing may have moved on since
        await _break_off(trace, sink, failure)
        return False
    return True


async def _stream_teacher(
    gw: Gateway, request: ParsedRequest, trace: Trace, sink: StreamSink, path: str
) -> bool:
    teacher = gw.engines["teacher"]
    body = upstream_body(request, teacher.served_name, logprobs_top=None)
    try:
        resp = await _open(gw, teacher, trace, body, path, retry=True)
    except UpstreamFailure as failure:
        raise UpstreamUnavailable(
            f"no engine could answer: student {trace.fallback_reason}, teacher {failure.reason}"
        ) from None
    trace.served_by = "teacher"
    trace.answer = ""
    teacher.in_flight += 1  # its stream is open: in flight until closed
    try:
        await sink.start(200, gw.route_headers(trace))
        try:
            await _pipe(gw, request, trace, sink, sse_events(resp), None, added_logprobs=False)
        except UpstreamFailure as failure:
            gw.failed(teacher)
            await _break_off(trace, sink, failure)
            return False
        return True
    finally:
        teacher.in_flight -= 1
        resp.close()


async def _break_off(trace: Trace, sink: StreamSink, failure: UpstreamFailure) -> None:
    """The engine failed after the client got part of its answer: no fallback is possible
    without showing two answers, so the stream ends with an error event."""
    _, body = error_body(UpstreamUnavailable(f"the answer broke off: {failure}"))
    trace.status = 502
    trace.error = body["error"]["message"]
    await sink.send(sse(body))
