"""What the gateway keeps of each request: its traffic record, its metrics, its shadow offer.

    trace = recorder.new_trace(request_id, user_key, arm)
    recorder.decided(trace, decision)          # confidence and fallback reason, on the trace
    recorder.offer_shadow(trace, ...)          # a served student answer, to the shadow scorer
    await recorder.finish(request, trace, endpoint)    # record + metrics (strict: committed)
    recorder.record_mirror(request, trace)     # a mirrored answer: a record, no user metrics

`traffic_record` is the one trace-to-record mapping, for users' requests and mirrors alike.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import time
from collections.abc import Callable
from typing import Any

from stillhouse.common.config import GatewaySettings
from stillhouse.common.traffic import MIRROR, TrafficRecord
from stillhouse.serving.gateway.assignment import Arm
from stillhouse.serving.gateway.confidence import TokenLogprobs
from stillhouse.serving.gateway.errors import TrafficLogUnavailable, error_body
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.policy import Decision
from stillhouse.serving.gateway.requests import ParsedRequest
from stillhouse.serving.gateway.shadow import ShadowItem, ShadowScorer
from stillhouse.serving.gateway.trace import Trace
from stillhouse.serving.gateway.traffic_log import TrafficLogWriter


def outcome(trace: Trace) -> str:
    """The `outcome` label of a finished request."""
    if trace.status < 400:
        return "ok"
    if trace.status == 503:
        return "unavailable"
    return "client_error" if trace.status < 500 else "error"


def traffic_record(
    trace: Trace,
    request: ParsedRequest | None,
    endpoint: str,
    latency_s: float,
    keep_text: bool,
) -> TrafficRecord:
    """The traffic record of a finished trace. `request` is None when the body did not parse;
    `keep_text` is `traffic_log.log_prompts`. A failed mirror has no answer to keep."""
    keep = keep_text and request is not None
    keep_answer = keep and (trace.status == 200 or trace.served_by != MIRROR)
    return TrafficRecord(
        request_id=trace.request_id,
        ts=trace.arrived,
        endpoint=endpoint,
        arm=trace.arm,
        served_by=trace.served_by,
        status=trace.status,
        latency_s=latency_s,
        stream=bool(request and request.stream),
        student_model=trace.student_model,
        fallback_reason=trace.fallback_reason,
        confidence=trace.confidence,
        ttft_s=trace.ttft_s,
        prompt_tokens=trace.prompt_tokens,
        completion_tokens=trace.completion_tokens,
        user_hash=trace.user_hash,
        prompt=request.prompt_text() if keep and request is not None else None,
        answer=trace.answer if keep_answer else None,
        student_answer=trace.student_answer if keep_text else None,
        student_completion_tokens=trace.student_completion_tokens,
        error=trace.error,
    )


class Recorder:
    """Writes what requests did to the traffic log and the metrics; offers shadow items."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        writer: TrafficLogWriter,
        shadow: ShadowScorer | None,
        rng: random.Random,
        clock: Callable[[], float],
        user_hash_key: bytes,
    ) -> None:
        self.metrics = metrics
        self.writer = writer
        self.shadow = shadow
        self.rng = rng
        self.clock = clock
        self._keep_text = settings.traffic_log.log_prompts
        self._strict = settings.traffic_log.sync == "strict"
        self._strict_timeout_s = settings.traffic_log.strict_timeout_s
        self._user_hash_key = user_hash_key
        self._shadow_fraction = settings.shadow.fraction if shadow is not None else 0.0

    def new_trace(self, request_id: str, key: str, arm: Arm) -> Trace:
        return Trace(request_id, time.time(), self.clock(), arm, self.user_hash(key))

    def user_hash(self, key: str) -> str:
        """The user as the traffic log keeps them: keyed with a secret, so an e-mail address
        cannot be found again by hashing a list of them."""
        digest = hmac.new(self._user_hash_key, key.encode("utf-8", "surrogateescape"), "sha256")
        return digest.hexdigest()[:16]

    # --- during the request ------------------------------------------------------------------

    def decided(self, trace: Trace, decision: Decision) -> None:
        """The fallback policy's decision on a student answer, kept on the trace."""
        if decision.score is not None:
            trace.confidence = decision.score
            self.metrics.confidence.labels(trace.arm).observe(max(decision.score, -1e9))
        trace.fallback_reason = decision.reason

    def fell_back(self, trace: Trace) -> None:
        """The teacher is asked instead (`trace.fallback_reason` says why)."""
        self.metrics.fallbacks.labels(trace.fallback_reason).inc()

    def rejected(self, role: str, status: int) -> None:
        """An engine rejected a request as invalid (its 400, 413, 422)."""
        self.metrics.engine_rejections.labels(role, str(status)).inc()

    def served_unsure(self, trace: Trace) -> None:
        """The policy wanted the teacher but it had no room: the student's answer is served
        (counted as shed on the teacher's budget, by load.py)."""
        trace.served_by = trace.arm
        trace.fallback_reason = None

    def wants_shadow(self) -> bool:
        """Whether to shadow-score this request's student answer (sampled when it starts)."""
        fraction = self._shadow_fraction
        return fraction > 0 and self.rng.random() < fraction

    def offer_shadow(
        self,
        trace: Trace,
        prompt_ids: list[int] | None,
        answer_ids: list[int] | None,
        tokens: list[TokenLogprobs],
        top: list[dict[int, float]] | None,
    ) -> None:
        if self.shadow is None or not prompt_ids or not answer_ids:
            return
        self.shadow.offer(
            ShadowItem(
                request_id=trace.request_id,
                ts=trace.arrived,
                student_model=trace.student_model,
                prompt_token_ids=tuple(prompt_ids),
                token_ids=tuple(answer_ids),
                student_logprobs=tuple(t.logprob for t in tokens),
                student_top=tuple(top) if top is not None else None,
            )
        )

    # --- at the end --------------------------------------------------------------------------

    def fail(self, trace: Trace, exc: BaseException) -> dict[str, Any]:
        """The trace of a failed request, and the OpenAI error body to answer with."""
        status, body = error_body(exc)
        trace.status = status
        trace.error = body["error"]["message"][:500]
        return body

    async def finish(self, request: ParsedRequest | None, trace: Trace, endpoint: str) -> None:
        """Metrics and the traffic record for a finished request. In strict mode it returns
        only once the record is committed (the caller sends the end of the answer after)."""
        latency = self.clock() - trace.started
        m = self.metrics
        m.requests.labels(trace.arm, trace.served_by, outcome(trace)).inc()
        m.latency.labels(trace.arm).observe(latency)
        if trace.ttft_s is not None:
            m.ttft.labels(trace.arm).observe(trace.ttft_s)
        m.overhead.observe(max(0.0, latency - trace.upstream_s))
        record = traffic_record(trace, request, endpoint, latency, self._keep_text)
        future = self.writer.submit(record)
        if self._strict:
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), self._strict_timeout_s)
            except Exception as exc:  # any commit error (sqlite3's own), or no commit in time
                raise TrafficLogUnavailable(
                    "the traffic log could not record this request (strict mode), so its "
                    f"answer is withheld: {exc or 'no commit in time'}"
                ) from None

    def record_mirror(self, request: ParsedRequest, trace: Trace) -> None:
        """A mirrored answer's record; the user-facing metrics never count a mirror."""
        latency = self.clock() - trace.started
        self.writer.submit(
            traffic_record(trace, request, request.endpoint, latency, self._keep_text)
        )
