"""The challenger's shadow phase: it answers mirrored traffic that no user sees, and its answers
are recorded, confidence-scored, shadow-scored and judged like a student's.

    user request → champion arm → the user's answer (champion, or the teacher after a fallback)
        └─ with probability `ab.mirror`, once the answer is done: a `MirrorJob` → bounded queue
    worker: the same request → challenger (non-streamed, with log-probabilities, as a student
            call) → the gateway's confidence rule → traffic record "<id>:mirror"
            (arm "challenger", served_by "mirror") → maybe the shadow scorer

Off the hot path by construction: `offer` never waits and runs after the user's answer is
decided, so the challenger can neither change, delay nor fail it; a full queue drops the job
(`stillhouse_mirror_requests_total{outcome="dropped"}`). Nothing falls back: a mirrored answer
the gateway would have replaced is recorded with `fallback_reason` set and no teacher call.

Circuit breaker: mirror calls never give the challenger's breaker a verdict. A slow or failing
challenger in shadow must not open the circuit its A/B users depend on (nor close one that user
traffic opened), and the half-open probe belongs to user traffic. While the circuit is open
mirror jobs are dropped, so an engine in trouble gets no extra load. Failures are counted
(`outcome="error"`) and recorded (status 502, or the engine's 4xx, with `fallback_reason` the
failure's reason: a challenger-arm request would have fallen back there too).

One call per job, no retries, `fallback.attempt_timeout_s` at most; its own request deadline
does not apply (no user waits). Its confidence is observed in
`stillhouse_gateway_confidence{arm="challenger"}` as a student answer's is; the user-facing
request, latency and fallback metrics never count a mirror.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from stillhouse.common.traffic import MIRROR, MIRROR_SUFFIX, TrafficRecord
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.core import PATHS, Gateway, Trace
from stillhouse.serving.gateway.errors import ClientError, error_body
from stillhouse.serving.gateway.requests import ParsedRequest
from stillhouse.serving.gateway.upstream import Engine, UpstreamFailure

log = logging.getLogger("stillhouse.mirror")

CHALLENGER = "challenger"


@dataclass(frozen=True)
class MirrorJob:
    request: ParsedRequest  # the client's request, as parsed
    request_id: str  # the original request's id
    user_hash: str  # the original request's user


def unstreamed(request: ParsedRequest) -> ParsedRequest:
    """The same request asked for in one piece (a mirror call is never streamed)."""
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
    return dataclasses.replace(request, body=body, stream=False, include_usage=False)


class Mirror:
    """Mirrors a share of champion-arm requests to the challenger; owned by the app."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metrics = gateway.metrics
        shadow = gateway.settings.shadow
        self.concurrency = shadow.mirror_concurrency
        self.queue: asyncio.Queue[MirrorJob] = asyncio.Queue(maxsize=shadow.mirror_queue_size)
        self.workers: list[asyncio.Task[None]] = []

    # --- the share --------------------------------------------------------------------------

    def export(self) -> None:
        """The gauge: the share in force (0 while there is no challenger engine)."""
        gw = self.gateway
        self.metrics.mirror_share.set(gw.ab.mirror if CHALLENGER in gw.engines else 0.0)

    def set_share(self, share: float, actor: str) -> float:
        """Change the mirror share; returns the previous one. Logged, exported, but not an
        `AbChange`: no user changes arm, so the sample-ratio check has nothing to learn."""
        previous, self.gateway.ab.mirror = self.gateway.ab.mirror, share
        self.export()
        log.info("mirror share changed by %s: %.4f -> %.4f", actor, previous, share)
        return previous

    # --- the queue --------------------------------------------------------------------------

    def offer(self, request: ParsedRequest | None, trace: Trace) -> bool:
        """After a request is answered: maybe queue its mirror. Never waits."""
        gw = self.gateway
        share = gw.ab.mirror
        if (
            share <= 0
            or request is None
            or trace.arm != "champion"
            or trace.status != 200
            or CHALLENGER not in gw.engines
            or gw.rng.random() >= share
        ):
            return False
        try:
            self.queue.put_nowait(MirrorJob(request, trace.request_id, trace.user_hash))
        except asyncio.QueueFull:
            self.metrics.mirror_requests.labels("dropped").inc()
            return False
        return True

    def start(self) -> None:
        self.workers = [
            asyncio.create_task(self._work(), name=f"mirror-{i}") for i in range(self.concurrency)
        ]

    async def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers = []

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                outcome = await self.run(job)
            except Exception:  # a bug must not end the worker; no user is waiting on it
                log.exception("mirroring %s failed", job.request_id)
                outcome = "error"
            finally:
                self.queue.task_done()
            self.metrics.mirror_requests.labels(outcome).inc()

    # --- one mirrored call ------------------------------------------------------------------

    async def run(self, job: MirrorJob) -> str:
        """Ask the challenger, score and record its answer; the outcome label."""
        gw = self.gateway
        engine = gw.engines.get(CHALLENGER)
        if engine is None or engine.breaker.current_state() == "open":
            return "dropped"
        request = unstreamed(job.request)
        trace = Trace(
            request_id=job.request_id + MIRROR_SUFFIX,
            arrived=time.time(),
            started=gw.clock(),
            arm=CHALLENGER,
            user_hash=job.user_hash,
            served_by=MIRROR,
            student_model=engine.ref,
        )
        shadow = gw.wants_shadow()
        data = await self._call(engine, request, trace, shadow)
        if data is not None:
            endpoint = request.endpoint
            # The gateway's own rule, with this engine's threshold: `fallback_reason` says what
            # it would have done.
            tokens = responses.token_logprobs(data, endpoint)
            would_fall_back = gw.low_confidence(tokens, trace, engine.threshold)
            trace.answer = responses.answer_text(data, endpoint)
            trace.prompt_tokens, trace.completion_tokens = responses.usage_counts(data)
            if shadow and not would_fall_back:  # as for a student: only answers it would serve
                prompt_ids, answer_ids = responses.token_ids(data)
                gw.offer_shadow(
                    trace, prompt_ids, answer_ids, tokens or [],
                    responses.top_by_token_id(data, endpoint),
                )  # fmt: skip
        gw.writer.submit(self.record(request, trace))
        return "ok" if data is not None else "error"

    async def _call(
        self, engine: Engine, request: ParsedRequest, trace: Trace, shadow: bool
    ) -> dict[str, Any] | None:
        """One call, outside the breaker but counted in flight (a hot swap drains the engine it
        replaces); None (and the trace says why) when it failed."""
        gw = self.gateway
        body = gw.student_body(request, engine, shadow)
        timeout = gw.settings.fallback.attempt_timeout_s
        try:
            with engine.use():
                return await gw.client.post_json(engine, PATHS[request.endpoint], body, timeout)
        except UpstreamFailure as failure:
            trace.fallback_reason = failure.reason
            trace.status, trace.error = 502, f"challenger (mirrored): {failure}"[:500]
        except ClientError as exc:  # the challenger rejected what the champion answered
            trace.status, payload = error_body(exc)
            trace.error = payload["error"]["message"][:500]
        finally:
            trace.upstream_s = gw.clock() - trace.started
        return None

    def record(self, request: ParsedRequest, trace: Trace) -> TrafficRecord:
        keep_text = self.gateway.settings.traffic_log.log_prompts
        return TrafficRecord(
            request_id=trace.request_id,
            ts=trace.arrived,
            endpoint=request.endpoint,
            arm=trace.arm,
            served_by=trace.served_by,
            status=trace.status,
            latency_s=self.gateway.clock() - trace.started,
            stream=False,
            student_model=trace.student_model,
            fallback_reason=trace.fallback_reason,
            confidence=trace.confidence,
            prompt_tokens=trace.prompt_tokens,
            completion_tokens=trace.completion_tokens,
            user_hash=trace.user_hash,
            prompt=request.prompt_text() if keep_text else None,
            answer=trace.answer if keep_text and trace.status == 200 else None,
            error=trace.error,
        )
