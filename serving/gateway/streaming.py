"""A user's request, streamed: hold the student's first tokens, decide, then stream one answer.

    held = student events until `hold_tokens` tokens (or the answer ends)
    low confidence / failure → drop the student stream, stream the teacher's answer from its start
    otherwise               → send the held events, then pipe the rest of the student's stream

Nothing reaches the client before the decision, so it never sees parts of two answers; the
price is that its first token waits for N student tokens (docs/gateway.md has the numbers).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from stillhouse.common.roles import Role
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.caller import EngineStream, Events
from stillhouse.serving.gateway.confidence import TokenLogprobs
from stillhouse.serving.gateway.errors import UpstreamClientError, UpstreamUnavailable, error_body
from stillhouse.serving.gateway.load import Slot
from stillhouse.serving.gateway.request_path import (
    RequestPath,
    judged_on_teacher,
    no_engine_answered,
)
from stillhouse.serving.gateway.requests import UPSTREAM_PATHS, ParsedRequest
from stillhouse.serving.gateway.student import StudentCall
from stillhouse.serving.gateway.trace import Trace, route_headers
from stillhouse.serving.gateway.upstream import UpstreamFailure

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class StreamSink:
    """Where a streamed answer goes (the HTTP response); the route implements it."""

    async def start(self, status: int, headers: dict[str, str]) -> None:
        raise NotImplementedError

    async def send(self, chunk: bytes) -> None:
        raise NotImplementedError


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


async def stream_answer(
    p: RequestPath, request: ParsedRequest, trace: Trace, sink: StreamSink
) -> bool:
    """Stream one answer into `sink`, all but the final `[DONE]`. Returns True when the answer
    is complete, False when it broke off after the response had started (an error event was
    sent). Raises a `GatewayError` when nothing was sent yet (the route answers in JSON)."""
    call = p.student.prepare(request, trace, p.router.engines[trace.arm])
    path = UPSTREAM_PATHS[request.endpoint]
    collected = StudentStream()
    stream: EngineStream | None = None
    slot: Slot | None = None
    student_failure: str | None = None
    try:
        try:
            stream = await p.caller.open_stream(call.engine, trace, path, call.body)
            await _hold(p, stream, collected, trace, request.endpoint)
            tokens = collected.tokens if collected.saw_logprobs else None
            if p.student.decide(call, trace, tokens).fall_back:
                stream.succeeded()  # it answered in time; the policy, not the engine, says no
                slot = p.teacher_slot(trace, has_student_answer=True)
                if slot is None:
                    p.recorder.served_unsure(trace)  # the teacher is full: keep the student
                else:
                    trace.student_answer = "".join(
                        responses.answer_text(e, request.endpoint) for e in collected.held
                    )
                    # The held tokens; the stream is cut here, so that is what the student
                    # spent (give or take the few it generated before it saw the cancel).
                    trace.student_completion_tokens = len(collected.tokens)
        except (UpstreamFailure, UpstreamClientError) as exc:
            student_failure = p.student_failed(call.engine, trace, exc)
        if trace.fallback_reason is None:
            assert stream is not None
            return await _serve_student(p, request, trace, sink, stream, collected, call)
    finally:
        if stream is not None:
            stream.close()
    if slot is None:
        slot = p.teacher_slot(trace, has_student_answer=False)
        assert slot is not None
    with slot:
        return await _stream_teacher(p, request, trace, sink, student_failure)


async def _hold(
    p: RequestPath, stream: EngineStream, collected: StudentStream, trace: Trace, endpoint: str
) -> None:
    """Read the student's stream until `hold_tokens` tokens are in or it ends: within the
    attempt timeout, or the attempt is a failure of the engine."""
    caller, student = p.caller, stream.engine
    timeout = caller.attempt_timeout(trace)  # a passed deadline is no fault of the engine
    started = caller.clock()
    try:
        async with asyncio.timeout(timeout):
            while len(collected.tokens) < p.hold_tokens:
                event = await anext(stream.events, None)
                if event is None:
                    collected.ended = True
                    return
                if "error" in event:
                    raise UpstreamFailure("upstream_5xx", f"{student.role} stream error")
                collected.held.append(event)
                collected.take(event, endpoint)
    except TimeoutError:
        stream.failed()
        raise UpstreamFailure("timeout", f"{student.role} held no answer in time") from None
    except UpstreamFailure:
        stream.failed()
        raise
    finally:
        trace.upstream_s += caller.clock() - started


async def _serve_student(
    p: RequestPath,
    request: ParsedRequest,
    trace: Trace,
    sink: StreamSink,
    stream: EngineStream,
    collected: StudentStream,
    call: StudentCall,
) -> bool:
    trace.served_by = trace.arm
    await sink.start(200, route_headers(trace))
    for event in collected.held:
        await _forward(p, request, trace, sink, event, added_logprobs=True)
    if not collected.ended:
        try:
            await _pipe(p, request, trace, sink, stream.events, collected, added_logprobs=True)
        except UpstreamFailure as failure:
            stream.failed()  # the engine it picked: routing may have moved on
            await _break_off(trace, sink, failure)
            return False
    stream.succeeded()
    p.student.served(
        call, trace, collected.prompt_ids, collected.answer_ids, collected.tokens, collected.top
    )
    return True


async def _stream_teacher(
    p: RequestPath,
    request: ParsedRequest,
    trace: Trace,
    sink: StreamSink,
    student_failure: str | None,
) -> bool:
    teacher, body = p.teacher(request, trace)
    path = UPSTREAM_PATHS[request.endpoint]
    judged = partial(judged_on_teacher, student_failure)
    try:
        stream = await p.caller.open_stream(teacher, trace, path, body, judged=judged)
    except UpstreamFailure as failure:
        raise no_engine_answered(trace, failure) from None
    trace.served_by = Role.TEACHER
    trace.answer = ""
    with stream:
        await sink.start(200, route_headers(trace))
        try:
            await _pipe(p, request, trace, sink, stream.events, None, added_logprobs=False)
        except UpstreamFailure as failure:
            stream.failed()
            await _break_off(trace, sink, failure)
            return False
        stream.succeeded()
        return True


async def _pipe(
    p: RequestPath,
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
        await _forward(p, request, trace, sink, event, added_logprobs)
    raise UpstreamFailure("connection", "the stream ended without [DONE]")


async def _forward(
    p: RequestPath,
    request: ParsedRequest,
    trace: Trace,
    sink: StreamSink,
    event: dict[str, Any],
    added_logprobs: bool,
) -> None:
    """Record one event and send it to the client in the shape it asked for."""
    if not _account(trace, event, request):
        return
    responses.shape_for_client(event, request, p.model_name, added_logprobs=added_logprobs)
    if trace.ttft_s is None:
        trace.ttft_s = p.caller.clock() - trace.started
    await sink.send(sse(event))


def _account(trace: Trace, event: dict[str, Any], request: ParsedRequest) -> bool:
    """Record the event's text and usage; False for a usage-only chunk the client did not ask
    for (the gateway asks for usage always, for the traffic log)."""
    trace.answer += responses.answer_text(event, request.endpoint)
    prompt_tokens, completion_tokens = responses.usage_counts(event)
    if completion_tokens is not None:
        trace.prompt_tokens, trace.completion_tokens = prompt_tokens, completion_tokens
    return bool(event.get("choices")) or request.include_usage


async def _break_off(trace: Trace, sink: StreamSink, failure: UpstreamFailure) -> None:
    """The engine failed after the client got part of its answer: no fallback is possible
    without showing two answers, so the stream ends with an error event."""
    _, body = error_body(UpstreamUnavailable(f"the answer broke off: {failure}"))
    trace.status = 502
    trace.error = body["error"]["message"]
    await sink.send(sse(body))
