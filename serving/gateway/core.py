"""The request path: assign an arm, ask the student, score its confidence, fall back to the
teacher when it is unsure or fails, and record what happened.

    arm = assign(user)                      sticky A/B (serving/assignment.py)
    answer = student(arm)                   with log-probabilities, under its circuit breaker
    if failed or confidence < threshold:    confidence over the first `hold_tokens` tokens
        answer = teacher                    the client never sees the student's answer
    record → traffic log, metrics; maybe → shadow queue (teacher scores the student's tokens)

Streaming holds the student's first `hold_tokens` tokens before sending a byte, then streams
either the student's continuation or, after a fallback, the teacher's whole answer, so a client
never sees parts of two answers. The same first-N rule scores non-streamed answers, so one
answer gets one decision whichever way it is asked for. The latency cost of holding: the
client's first token arrives after N student tokens instead of one (about N × the student's
inter-token time), and a fallback adds the teacher's time to first token on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from stillhouse.common.config import GatewaySettings
from stillhouse.common.traffic import AbChange, TrafficRecord
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.assignment import Arm, assign_arm
from stillhouse.serving.gateway.breaker import STATE_VALUE
from stillhouse.serving.gateway.confidence import TokenLogprobs, confidence, is_low
from stillhouse.serving.gateway.errors import UpstreamUnavailable, error_body
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.requests import ParsedRequest, upstream_body
from stillhouse.serving.gateway.shadow import ShadowJob, ShadowScorer
from stillhouse.serving.gateway.traffic_log import TrafficLogWriter
from stillhouse.serving.gateway.upstream import Engine, UpstreamClient, UpstreamFailure

log = logging.getLogger("stillhouse.gateway")

PATHS = {"chat": "/chat/completions", "completions": "/completions"}
DRAIN_POLL_S = 0.05


@dataclass
class AbState:
    """The live A/B split; the admin API changes it, the traffic log records each change."""

    share: float
    seed: str
    # Shadow phase: the fraction of requests not assigned to the challenger that are also sent
    # to it in the background (serving/mirror.py); not a split change, so not an AbChange.
    mirror: float = 0.0


@dataclass
class Trace:
    """What one request did, filled in as it goes; becomes its traffic record and metrics."""

    request_id: str
    arrived: float  # wall clock
    started: float  # monotonic
    arm: Arm
    user_hash: str
    served_by: str = "none"
    fallback_reason: str | None = None
    confidence: float | None = None
    upstream_s: float = 0.0
    ttft_s: float | None = None
    status: int = 200
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answer: str = ""
    student_answer: str | None = None
    student_completion_tokens: int | None = None
    student_model: str | None = None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


class StreamSink:
    """Where a streamed answer goes (the HTTP response); the route implements it."""

    async def start(self, status: int, headers: dict[str, str]) -> None:
        raise NotImplementedError

    async def send(self, chunk: bytes) -> None:
        raise NotImplementedError


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Gateway:
    settings: GatewaySettings
    engines: dict[str, Engine]
    client: UpstreamClient
    metrics: GatewayMetrics
    writer: TrafficLogWriter
    shadow: ShadowScorer | None
    ab: AbState
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic

    # --- A/B --------------------------------------------------------------------------------

    def assign(self, key: str) -> Arm:
        if "challenger" not in self.engines:
            return "champion"
        return assign_arm(key, self.ab.seed, self.ab.share)

    async def set_ab(self, share: float, seed: str, actor: str) -> AbChange:
        change = AbChange(time.time(), share, seed, self.ab.share, self.ab.seed, actor)
        self.ab.share, self.ab.seed = share, seed
        self.metrics.challenger_share.set(share if "challenger" in self.engines else 0.0)
        log.info("A/B changed by %s: share %.4f -> %.4f, seed %r -> %r",
                 actor, change.previous_share, share, change.previous_seed, seed)  # fmt: skip
        await asyncio.wrap_future(self.writer.submit(change))
        return change

    def new_trace(self, request_id: str, key: str) -> Trace:
        user_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
        return Trace(request_id, time.time(), self.clock(), self.assign(key), user_hash)

    # --- engines (hot swap) ------------------------------------------------------------------

    def swap_engine(self, role: str, engine: Engine) -> Engine | None:
        """Route `role` to `engine` from now on and return the engine it replaces (None: the
        role is new). One event loop, no await: atomic for every request; those already
        running keep the Engine they picked (drain it before stopping its server)."""
        old = self.engines.get(role)
        self.engines[role] = engine
        self.export_breaker(engine)
        if role == "challenger" and old is None:
            self._challenger_presence(True)
        return old

    def remove_engine(self, role: str) -> Engine | None:
        """Stop routing to `role` (only the challenger may go); returns its engine, to drain."""
        if role in ("teacher", "champion"):
            raise ValueError(f"the gateway cannot run without a {role}")
        old = self.engines.pop(role, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                self.metrics.circuit_state.remove(role)
            if role == "challenger":
                self._challenger_presence(False)
        return old

    async def drain(self, engine: Engine, timeout_s: float) -> bool:
        """Wait until no request uses `engine` any more; False if some still do at the end."""
        deadline = time.monotonic() + timeout_s
        while engine.in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    def _challenger_presence(self, present: bool) -> None:
        # The share in force changes without an admin call: logged like one, so the A/B
        # sample-ratio check knows which share applied to every request.
        share = self.ab.share if present else 0.0
        previous = 0.0 if present else self.ab.share
        self.metrics.challenger_share.set(share)
        self.writer.submit(
            AbChange(time.time(), share, self.ab.seed, previous, self.ab.seed, "engine-watcher")
        )

    # --- engine calls -----------------------------------------------------------------------

    def _remaining(self, trace: Trace) -> float:
        return self.settings.fallback.deadline_s - (self.clock() - trace.started)

    def attempt_timeout(self, trace: Trace) -> float:
        remaining = self._remaining(trace)
        if remaining <= 0:
            raise UpstreamFailure("timeout", "the request's deadline passed")
        return min(self.settings.fallback.attempt_timeout_s, remaining)

    def failed(self, engine: Engine) -> None:
        engine.breaker.record_failure()
        self.metrics.engine_failures.labels(engine.role).inc()
        self.export_breaker(engine)

    def export_breaker(self, engine: Engine) -> None:
        state = engine.breaker.current_state()  # an elapsed cool-down reads half-open
        self.metrics.circuit_state.labels(engine.role).set(STATE_VALUE[state])

    async def call(
        self,
        engine: Engine,
        trace: Trace,
        attempt: Callable[[float], Awaitable[Any]],
        retry_timeouts: bool,
    ) -> Any:
        """Run `attempt(timeout)` against `engine` with bounded retries inside the deadline,
        under its circuit breaker. Raises the last `UpstreamFailure`."""
        with engine.use():  # counted in flight: a hot swap drains the old engine on this
            return await self._attempts(engine, trace, attempt, retry_timeouts)

    async def _attempts(
        self,
        engine: Engine,
        trace: Trace,
        attempt: Callable[[float], Awaitable[Any]],
        retry_timeouts: bool,
    ) -> Any:
        tries = 1 + self.settings.fallback.retries
        last = UpstreamFailure("circuit_open", f"{engine.role} circuit is open")
        for _ in range(tries):
            # A passed deadline is no fault of the engine: checked before its breaker is asked.
            timeout = self.attempt_timeout(trace)
            if not engine.breaker.allow():
                self.export_breaker(engine)
                raise last
            started = self.clock()
            try:
                result = await attempt(timeout)
            except UpstreamFailure as failure:
                self.failed(engine)
                last = failure
                if failure.reason == "timeout" and not retry_timeouts:
                    break
                continue
            except BaseException:  # the client's 4xx, a cancel: no verdict on the engine
                engine.breaker.release_probe()
                raise
            finally:
                trace.upstream_s += self.clock() - started
            engine.breaker.record_success()
            self.export_breaker(engine)
            return result
        raise last

    # --- decisions --------------------------------------------------------------------------

    def low_confidence(
        self, tokens: list[TokenLogprobs] | None, trace: Trace, threshold: float | None = None
    ) -> bool:
        """`threshold`: the serving version's calibrated one; None: the configured one."""
        conf = self.settings.confidence
        if not conf.enabled:
            return False
        if tokens is None:
            trace.fallback_reason = "no_logprobs"
            return True
        score = confidence(tokens[: conf.hold_tokens], conf.signal, conf.quantile)
        trace.confidence = score
        self.metrics.confidence.labels(trace.arm).observe(max(score, -1e9))
        if is_low(score, conf.threshold if threshold is None else threshold):
            trace.fallback_reason = "low_confidence"
            return True
        return False

    def wants_shadow(self) -> bool:
        fraction = self.settings.shadow.fraction
        return self.shadow is not None and fraction > 0 and self.rng.random() < fraction

    def student_body(self, request: ParsedRequest, engine: Engine, shadow: bool) -> dict:
        body = upstream_body(
            request, engine.served_name, logprobs_top=self.settings.confidence.top_k,
            token_ids=shadow,
        )  # fmt: skip
        if shadow and not request.wants_logprobs:
            body["return_tokens_as_token_ids"] = True  # top-k by id, for the overlap bound
        return body

    # --- non-streaming ----------------------------------------------------------------------

    async def complete(self, request: ParsedRequest, trace: Trace) -> Reply:
        student = self.engines[trace.arm]
        trace.student_model = student.ref
        path = PATHS[request.endpoint]
        shadow = self.wants_shadow()
        data: dict[str, Any] | None = None
        try:
            body = self.student_body(request, student, shadow)
            data = await self.call(
                student,
                trace,
                lambda t: self.client.post_json(student, path, body, t),
                retry_timeouts=False,
            )
            tokens = responses.token_logprobs(data, request.endpoint)
            if self.low_confidence(tokens, trace, student.threshold):
                trace.student_answer = responses.answer_text(data, request.endpoint)
                trace.student_completion_tokens = responses.usage_counts(data)[1]
            else:
                trace.served_by = trace.arm
        except UpstreamFailure as failure:
            trace.fallback_reason = failure.reason
        if trace.fallback_reason is not None:
            self.metrics.fallbacks.labels(trace.fallback_reason).inc()
            shadow = False  # the teacher answered: nothing of the student's to score
            teacher = self.engines["teacher"]
            body = upstream_body(request, teacher.served_name, logprobs_top=None)
            try:
                data = await self.call(
                    teacher,
                    trace,
                    lambda t: self.client.post_json(teacher, path, body, t),
                    retry_timeouts=True,
                )
            except UpstreamFailure as failure:
                raise UpstreamUnavailable(
                    f"no engine could answer: student {trace.fallback_reason}, "
                    f"teacher {failure.reason}"
                ) from None
            trace.served_by = "teacher"
        assert data is not None
        if shadow:
            self._offer_shadow(trace, data, request.endpoint)
        trace.answer = responses.answer_text(data, request.endpoint)
        trace.prompt_tokens, trace.completion_tokens = responses.usage_counts(data)
        added = trace.served_by != "teacher"
        responses.shape_for_client(data, request, self.settings.model_name, added_logprobs=added)
        return Reply(200, self.route_headers(trace), data)

    def _offer_shadow(self, trace: Trace, data: dict[str, Any], endpoint: str) -> None:
        prompt_ids, answer_ids = responses.token_ids(data)
        tokens = responses.token_logprobs(data, endpoint) or []
        top = responses.top_by_token_id(data, endpoint)
        self.offer_shadow(trace, prompt_ids, answer_ids, tokens, top)

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
            ShadowJob(
                request_id=trace.request_id,
                ts=trace.arrived,
                student_model=trace.student_model,
                prompt_token_ids=tuple(prompt_ids),
                token_ids=tuple(answer_ids),
                student_logprobs=tuple(t.logprob for t in tokens),
                student_top=tuple(top) if top is not None else None,
            )
        )

    def route_headers(self, trace: Trace) -> dict[str, str]:
        return {
            "x-request-id": trace.request_id,
            "x-stillhouse-arm": trace.arm,
            "x-stillhouse-served-by": trace.served_by,
            "x-stillhouse-fallback": trace.fallback_reason or "none",
        }

    # --- bookkeeping ------------------------------------------------------------------------

    def outcome(self, trace: Trace) -> str:
        if trace.status < 400:
            return "ok"
        if trace.status == 503:
            return "unavailable"
        return "client_error" if trace.status < 500 else "error"

    async def finish(self, request: ParsedRequest | None, trace: Trace, endpoint: str) -> None:
        """Metrics and the traffic record for a finished request. In strict mode it returns
        only once the record is committed (the caller sends the end of the answer after)."""
        latency = self.clock() - trace.started
        self.metrics.requests.labels(trace.arm, trace.served_by, self.outcome(trace)).inc()
        self.metrics.latency.labels(trace.arm).observe(latency)
        if trace.ttft_s is not None:
            self.metrics.ttft.labels(trace.arm).observe(trace.ttft_s)
        self.metrics.overhead.observe(max(0.0, latency - trace.upstream_s))
        keep_text = self.settings.traffic_log.log_prompts
        record = TrafficRecord(
            request_id=trace.request_id,
            ts=trace.arrived,
            endpoint=endpoint,
            arm=trace.arm,
            served_by=trace.served_by,
            status=trace.status,
            latency_s=latency,
            stream=bool(request and request.stream),
            student_model=trace.student_model,
            fallback_reason=trace.fallback_reason,
            confidence=trace.confidence,
            ttft_s=trace.ttft_s,
            prompt_tokens=trace.prompt_tokens,
            completion_tokens=trace.completion_tokens,
            user_hash=trace.user_hash,
            prompt=request.prompt_text() if keep_text and request is not None else None,
            answer=trace.answer if keep_text and request is not None else None,
            student_answer=trace.student_answer if keep_text else None,
            student_completion_tokens=trace.student_completion_tokens,
            error=trace.error,
        )
        future = self.writer.submit(record)
        if self.settings.traffic_log.sync == "strict":
            await asyncio.wrap_future(future)

    def fail(self, trace: Trace, exc: BaseException) -> dict[str, Any]:
        status, body = error_body(exc)
        trace.status = status
        trace.error = body["error"]["message"][:500]
        return body
