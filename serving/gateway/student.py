"""Asking a student: the step the three transports share (non-streamed, streamed, mirror).

    call = step.prepare(request, trace, engine)   # the body: log-probabilities, token ids
    ... the transport sends `call.body` and collects the tokens its own way ...
    decision = step.decide(call, trace, tokens)   # the engine's FallbackPolicy, on the trace
    step.served(call, trace, ...)                 # served as is: maybe to the shadow scorer

Whether a request is shadow-scored is drawn once, in `prepare`, because it changes what the
student is asked for (token ids, and top-k by id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.confidence import TokenLogprobs
from stillhouse.serving.gateway.policy import Decision
from stillhouse.serving.gateway.recorder import Recorder
from stillhouse.serving.gateway.requests import ParsedRequest, upstream_body
from stillhouse.serving.gateway.trace import Trace
from stillhouse.serving.gateway.upstream import Engine


@dataclass(frozen=True, slots=True)
class StudentCall:
    """One request to a student engine, prepared."""

    engine: Engine
    body: dict[str, Any]
    shadow: bool  # its answer goes to the shadow scorer if it is served


def student_body(
    request: ParsedRequest, served_name: str, top_k: int, shadow: bool
) -> dict[str, Any]:
    """The student is always asked for `top_k` log-probabilities (the confidence needs them);
    a shadow-scored one also for token ids, and top-k by id for the overlap bound."""
    body = upstream_body(request, served_name, logprobs_top=top_k, token_ids=shadow)
    if shadow and not request.wants_logprobs:
        body["return_tokens_as_token_ids"] = True
    return body


class StudentStep:
    """What every transport does before and after its call to a student."""

    def __init__(self, top_k: int, recorder: Recorder) -> None:
        self.top_k = top_k
        self.recorder = recorder

    def prepare(self, request: ParsedRequest, trace: Trace, engine: Engine) -> StudentCall:
        trace.student_model = engine.ref
        shadow = self.recorder.wants_shadow()
        body = student_body(request, engine.served_name, self.top_k, shadow)
        return StudentCall(engine, body, shadow)

    def decide(
        self, call: StudentCall, trace: Trace, tokens: list[TokenLogprobs] | None
    ) -> Decision:
        """The engine's own policy (its calibrated threshold) on the answer's tokens."""
        decision = call.engine.policy.decide(tokens)
        self.recorder.decided(trace, decision)
        return decision

    def served(
        self,
        call: StudentCall,
        trace: Trace,
        prompt_ids: list[int] | None,
        answer_ids: list[int] | None,
        tokens: list[TokenLogprobs],
        top: list[dict[int, float]] | None,
    ) -> None:
        """The student's answer stands: offer it to the shadow scorer if it was drawn."""
        if call.shadow:
            self.recorder.offer_shadow(trace, prompt_ids, answer_ids, tokens, top)

    def served_json(
        self,
        call: StudentCall,
        trace: Trace,
        data: dict[str, Any],
        endpoint: str,
        tokens: list[TokenLogprobs] | None,
    ) -> None:
        """`served` for a whole JSON answer (non-streamed, mirror)."""
        if call.shadow:
            prompt_ids, answer_ids = responses.token_ids(data)
            top = responses.top_by_token_id(data, endpoint)
            self.recorder.offer_shadow(trace, prompt_ids, answer_ids, tokens or [], top)
