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
from functools import partial
from typing import Any

from stillhouse.common.roles import Role
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.caller import EngineCaller
from stillhouse.serving.gateway.errors import UpstreamClientError, UpstreamUnavailable
from stillhouse.serving.gateway.load import Shedder, Slot
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
    shedder: Shedder
    model_name: str  # the logical model clients ask for
    hold_tokens: int  # the student tokens a stream holds before the decision
    max_tokens_limit: int  # a request's max_tokens when it sets none (the attempt budget)

    def teacher(self, request: ParsedRequest, trace: Trace) -> tuple[Engine, dict[str, Any]]:
        """The fallback starts (counted): the teacher, and its body (the client's own
        log-probability choice, nothing added)."""
        self.recorder.fell_back(trace)
        teacher = self.router.engines[Role.TEACHER]
        return teacher, upstream_body(request, teacher.served_name, logprobs_top=None)

    def max_tokens(self, request: ParsedRequest) -> int:
        return request.body.get("max_tokens") or self.max_tokens_limit

    def teacher_slot(self, trace: Trace, has_student_answer: bool) -> Slot | None:
        """Room on the teacher for this fallback. None: none, and the student's own
        (low-confidence) answer is served instead. Raises `Overloaded` when there is no room
        and no student answer to serve."""
        slot = self.shedder.try_teacher()
        if slot is None and not has_student_answer:
            raise self.shedder.refusal(
                f"the student failed ({trace.fallback_reason}) and the teacher is at its "
                "concurrency limit"
            )
        return slot

    def student_failed(
        self, engine: Engine, trace: Trace, exc: UpstreamFailure | UpstreamClientError
    ) -> str:
        """The student's attempt failed (the engine's fault) or it rejected the request (maybe
        its own limit: the teacher decides): the fallback reason, on the trace too."""
        if isinstance(exc, UpstreamClientError):
            self.recorder.rejected(engine.role, exc.status)
            trace.fallback_reason = "engine_rejected"
        else:
            trace.fallback_reason = exc.reason
        return trace.fallback_reason

    async def complete(self, request: ParsedRequest, trace: Trace) -> Reply:
        """One non-streamed answer; raises `UpstreamUnavailable` when no engine answers."""
        path = UPSTREAM_PATHS[request.endpoint]
        call = self.student.prepare(request, trace, self.router.engines[trace.arm])
        data: dict[str, Any] | None = None
        tokens = None
        student_failure: str | None = None
        try:
            data = await self.caller.post_json(
                call.engine, trace, path, call.body, max_tokens=self.max_tokens(request)
            )
            tokens = responses.token_logprobs(data, request.endpoint)
            if self.student.decide(call, trace, tokens).fall_back:
                trace.student_answer = responses.answer_text(data, request.endpoint)
                trace.student_completion_tokens = responses.usage_counts(data)[1]
            else:
                trace.served_by = trace.arm
        except (UpstreamFailure, UpstreamClientError) as exc:
            student_failure = self.student_failed(call.engine, trace, exc)
            data = None
        if trace.fallback_reason is not None:
            slot = self.teacher_slot(trace, has_student_answer=data is not None)
            if slot is None:
                self.recorder.served_unsure(trace)
            else:
                with slot:
                    data = await self._teacher_json(request, trace, path, student_failure)
        else:
            assert data is not None
            self.student.served_json(call, trace, data, request.endpoint, tokens)
        assert data is not None
        trace.answer = responses.answer_text(data, request.endpoint)
        trace.prompt_tokens, trace.completion_tokens = responses.usage_counts(data)
        added = trace.served_by != Role.TEACHER
        responses.shape_for_client(data, request, self.model_name, added_logprobs=added)
        return Reply(200, route_headers(trace), data)

    async def _teacher_json(
        self, request: ParsedRequest, trace: Trace, path: str, student_failure: str | None
    ) -> dict[str, Any]:
        teacher, body = self.teacher(request, trace)
        try:
            data = await self.caller.post_json(
                teacher,
                trace,
                path,
                body,
                max_tokens=self.max_tokens(request),
                judged=partial(judged_on_teacher, student_failure),
            )
        except UpstreamFailure as failure:
            raise no_engine_answered(trace, failure) from None
        trace.served_by = Role.TEACHER
        return data


def judged_on_teacher(student_failure: str | None, failure: UpstreamFailure) -> bool:
    """Whether the teacher's failure counts against its breaker. Not when the student failed
    the same request with a 5xx too: the request itself is the likely cause (a query of death),
    and one bad request repeated must not open every breaker."""
    return not (student_failure == "upstream_5xx" and failure.reason == "upstream_5xx")


def no_engine_answered(trace: Trace, failure: UpstreamFailure) -> UpstreamUnavailable:
    """The teacher failed too, after the student's `trace.fallback_reason`: a 503."""
    return UpstreamUnavailable(
        f"no engine could answer: student {trace.fallback_reason}, teacher {failure.reason}"
    )
