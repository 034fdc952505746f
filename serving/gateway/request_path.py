"""A user's request, non-streamed: ask the arm's student, fall back to the teacher when its
policy says so or it fails, and shape the answer for the client.

    answer = student(arm)                   with log-probabilities, under its circuit breaker
    if failed or policy.decide(tokens):     confidence over the first `hold_tokens` tokens
        answer = teacher                    the client never sees the student's answer

`RequestPath` holds the parts both user-facing transports run through (this one and
streaming.py) and the teacher fallback they share. A walk through the whole path is in
docs/gateway.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stillhouse.common.roles import Role
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.caller import EngineCaller
from stillhouse.serving.gateway.errors import UpstreamUnavailable
from stillhouse.serving.gateway.recorder import Recorder
from stillhouse.serving.gateway.requests import UPSTREAM_PATHS, ParsedRequest, upstream_body
from stillhouse.serving.gateway.router import Router
from stillhouse.serving.gateway.student import StudentStep
from stillhouse.serving.gateway.trace import Reply, Trace, route_headers
from stillhouse.serving.gateway.upstream import Engine, UpstreamFailure


@dataclass(frozen=True)
class RequestPath:
    router: Router
    caller: EngineCaller
    student: StudentStep
    recorder: Recorder
    model_name: str  # the logical model clients ask for
    hold_tokens: int  # the student tokens a stream holds before the decision

    def teacher(self, request: ParsedRequest, trace: Trace) -> tuple[Engine, dict[str, Any]]:
        """The fallback starts (counted): the teacher, and its body (the client's own
        log-probability choice, nothing added)."""
        self.recorder.fell_back(trace)
        teacher = self.router.engines[Role.TEACHER]
        return teacher, upstream_body(request, teacher.served_name, logprobs_top=None)

    async def complete(self, request: ParsedRequest, trace: Trace) -> Reply:
        """One non-streamed answer; raises `UpstreamUnavailable` when no engine answers."""
        path = UPSTREAM_PATHS[request.endpoint]
        call = self.student.prepare(request, trace, self.router.engines[trace.arm])
        data: dict[str, Any] | None = None
        tokens = None
        try:
            data = await self.caller.post_json(
                call.engine, trace, path, call.body, retry_timeouts=False
            )
            tokens = responses.token_logprobs(data, request.endpoint)
            if self.student.decide(call, trace, tokens).fall_back:
                trace.student_answer = responses.answer_text(data, request.endpoint)
                trace.student_completion_tokens = responses.usage_counts(data)[1]
            else:
                trace.served_by = trace.arm
        except UpstreamFailure as failure:
            trace.fallback_reason = failure.reason
        if trace.fallback_reason is not None:
            teacher, body = self.teacher(request, trace)
            try:
                data = await self.caller.post_json(teacher, trace, path, body, retry_timeouts=True)
            except UpstreamFailure as failure:
                raise no_engine_answered(trace, failure) from None
            trace.served_by = Role.TEACHER
        else:
            assert data is not None
            self.student.served_json(call, trace, data, request.endpoint, tokens)
        assert data is not None
        trace.answer = responses.answer_text(data, request.endpoint)
        trace.prompt_tokens, trace.completion_tokens = responses.usage_counts(data)
        added = trace.served_by != Role.TEACHER
        responses.shape_for_client(data, request, self.model_name, added_logprobs=added)
        return Reply(200, route_headers(trace), data)


def no_engine_answered(trace: Trace, failure: UpstreamFailure) -> UpstreamUnavailable:
    """The teacher failed too, after the student's `trace.fallback_reason`: a 503."""
    return UpstreamUnavailable(
        f"no engine could answer: student {trace.fallback_reason}, teacher {failure.reason}"
    )
